"""Cluster adapters into K groups that each share one basis per module (k-means over subspaces).

One assignment per adapter (an adapter is one serving unit); the cost of putting adapter i in
cluster c is its squared relative projection error on c's basis, summed over all modules. The
loop alternates (1) a JD fit per cluster and module, warm-started from the previous basis, and
(2) reassignment to the cheapest cluster, until assignments are stable or max_rounds is hit.
Both steps lower the same objective (sum of relative errors), so it converges.

Initialisation is greedy k-means++ over subspaces: clusters are seeded with single adapters (their
basis refitted on a few nearest neighbours when the rank exceeds the LoRA rank), each next seed
drawn with probability proportional to its projection error on the nearest seed basis.
Empty clusters are re-seeded with the worst-fitting adapter of a cluster that can spare one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from compression.factors import FactorStack
from compression.jd import JDConfig, Method, check_method, fit_module, project_with_error

Bases = dict[str, tuple[Tensor, Tensor]]  # module -> (U [K, d_out, r], V [K, d_in, r])
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
_TIE = 1e-6  # an adapter only moves if another cluster is cheaper by more than this


@dataclass
class ClusterResult:
    """Final assignment, per-module cluster bases and the [n, K] cost matrix they produce."""

    assignment: list[int]
    bases: Bases
    costs: Tensor  # [n, K] summed (over modules) squared relative error of adapter i on cluster c
    rounds: int
    converged: bool
    history: list[float]  # Σ_i costs[i, assignment[i]] after each fit (non-increasing in theory)


def assignment_costs(stacks: Mapping[str, FactorStack], bases: Bases, method: Method) -> Tensor:
    """Cost [n, K]: Σ_modules of the squared relative error of each adapter projected on each cluster."""
    n = next(iter(stacks.values())).n
    K = next(iter(bases.values()))[0].shape[0]
    costs = torch.zeros(n, K)
    for module, stack in stacks.items():
        U, V = bases[module]
        for c in range(K):
            costs[:, c] += project_with_error(stack, U[c], V[c], method)[1]
    return costs


def fill_empty_clusters(assignment: Sequence[int], costs: Tensor, K: int) -> list[int]:
    """Give every empty cluster the worst-fitting adapter taken from a cluster with >= 2 members."""
    assignment = list(assignment)
    for k in range(K):
        if k in assignment:
            continue
        sizes = Counter(assignment)
        movable = [i for i, c in enumerate(assignment) if sizes[c] > 1]
        worst = max(movable, key=lambda i: float(costs[i, assignment[i]]))
        assignment[worst] = k
    return assignment


def _reassign(costs: Tensor, current: Sequence[int]) -> list[int]:
    best = costs.argmin(1)
    keep = costs[torch.arange(len(current)), torch.as_tensor(current)] <= costs.min(1).values + _TIE
    return torch.where(keep, torch.as_tensor(current), best).tolist()


def fit_clusters(
    stacks: Mapping[str, FactorStack],
    assignment: Sequence[int],
    K: int,
    rank: int,
    method: Method,
    config: JDConfig | None = None,
    init: Bases | None = None,
    seed: int = 0,
) -> Bases:
    """JD fit of every (cluster, module) on the cluster's members; `init` warm-starts from old bases."""
    bases: Bases = {}
    for module, stack in stacks.items():
        Us, Vs = [], []
        for c in range(K):
            members = [i for i, a in enumerate(assignment) if a == c]
            warm = None if init is None else (init[module][0][c], init[module][1][c])
            fit = fit_module(stack.select(members), rank, method, config, init=warm, seed=seed + c)
            Us.append(fit.U)
            Vs.append(fit.V)
        bases[module] = (torch.stack(Us), torch.stack(Vs))
    return bases


def _single_adapter_costs(
    stacks: Mapping[str, FactorStack], i: int, rank: int, config: JDConfig | None
) -> Tensor:
    """Costs [n] of every adapter on a JD-Full basis fitted to adapter i alone."""
    single = {module: stack.select([i]) for module, stack in stacks.items()}
    return assignment_costs(stacks, fit_clusters(single, [0], 1, rank, "full", config, seed=i), "full")[:, 0]


def _neighbourhood_costs(
    stacks: Mapping[str, FactorStack], i: int, single: Tensor, size: int, rank: int, config: JDConfig | None
) -> Tensor:
    """Costs [n] on a JD-Full basis fitted to adapter i and its size − 1 nearest adapters (by `single`)."""
    if size <= 1:
        return single
    members = [i, *[j for j in single.argsort().tolist() if j != i][: size - 1]]
    group = {module: stack.select(members) for module, stack in stacks.items()}
    return assignment_costs(stacks, fit_clusters(group, [0] * size, 1, rank, "full", config, seed=i), "full")[:, 0]


def _seed_assignment(
    stacks: Mapping[str, FactorStack],
    K: int,
    rank: int,
    config: JDConfig | None,
    generator: torch.Generator,
    progress: ProgressFn | None,
) -> list[int]:
    """Greedy k-means++ over subspaces: the initial assignment to K seed bases.

    Each new seed is the best (lowest total cost) of 2 + ln K candidates drawn ∝ their error on
    the nearest existing seed basis. Seeding always compares subspaces (JD-Full costs): a diagonal
    basis fitted to one adapter cannot express its neighbours' cross terms. When the rank exceeds
    the adapters' LoRA rank R, one adapter fills only R of a seed basis' r directions, so its
    neighbours look barely closer than other groups and draws often land twice in one group: the
    chosen seed's basis is then refitted on its ⌈2r/R⌉ nearest adapters (at most n/2K) before the
    next draw, which sharpens the sampling weights.
    """
    n = next(iter(stacks.values())).n
    trials = 2 + int(math.log(K))
    lora_rank = max(stack.B.shape[2] for stack in stacks.values())
    size = max(1, min(n // (2 * K), math.ceil(2 * rank / lora_rank)))
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    single = _single_adapter_costs(stacks, seeds[0], rank, config)
    columns = [_neighbourhood_costs(stacks, seeds[0], single, size, rank, config)]
    while len(seeds) < K:
        if progress is not None:
            progress("seed", len(seeds), K)
        nearest = torch.stack(columns, 1).min(1).values.clamp_min(0)
        nearest[seeds] = 0
        if nearest.sum() <= 0:  # every adapter already fits a seed: draw among the non-seeds
            nearest = torch.ones(n)
            nearest[seeds] = 0
        draws = torch.multinomial(nearest, min(trials, int((nearest > 0).sum())), generator=generator)
        candidates = [(int(i), _single_adapter_costs(stacks, int(i), rank, config)) for i in draws]
        best, column = min(candidates, key=lambda ic: float(torch.minimum(nearest, ic[1]).sum()))
        seeds.append(best)
        columns.append(_neighbourhood_costs(stacks, best, column, size, rank, config))
    assignment = torch.stack(columns, 1).argmin(1).tolist()
    for k, i in enumerate(seeds):
        assignment[i] = k
    return assignment


def cluster_adapters(
    stacks: Mapping[str, FactorStack],
    rank: int,
    clusters: int,
    method: Method = "full",
    seed: int = 0,
    config: JDConfig | None = None,
    max_rounds: int = 10,
    progress: ProgressFn | None = None,
    init_assignment: Sequence[int] | None = None,
) -> ClusterResult:
    """Partition n adapters into `clusters` groups and fit one basis per (group, module).

    `stacks` maps module name -> FactorStack, all with the same adapter order. Deterministic for a
    given seed. `init_assignment` (e.g. an existing bank's clusters) replaces the k-means++ seeding,
    which is how a grown bank is re-clustered offline. Returns assignment, bases and cost matrix.
    """
    check_method(method)
    n = next(iter(stacks.values())).n
    if not isinstance(clusters, int) or not 1 <= clusters <= n:
        raise ValueError(f"clusters must be an int in [1, number of adapters={n}], got {clusters!r}")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds!r}")
    if init_assignment is not None:
        assignment = list(init_assignment)
        if len(assignment) != n or sorted(set(assignment)) != list(range(clusters)):
            raise ValueError(
                f"init_assignment must give each of the {n} adapters a cluster id in [0, {clusters}) "
                f"and use every id, got {assignment}"
            )
    elif clusters == 1:
        assignment = [0] * n
    else:
        assignment = _seed_assignment(
            stacks, clusters, rank, config, torch.Generator().manual_seed(seed), progress
        )
    bases = fit_clusters(stacks, assignment, clusters, rank, method, config, seed=seed)
    rounds, converged, history = 0, False, []
    while True:
        costs = assignment_costs(stacks, bases, method)
        history.append(float(costs[torch.arange(n), torch.tensor(assignment)].sum()))
        if progress is not None:
            progress("cluster", rounds, max_rounds)
        if converged or rounds == max_rounds:
            break
        new = fill_empty_clusters(_reassign(costs, assignment), costs, clusters)
        rounds += 1
        converged = new == assignment
        if not converged:
            assignment = new
            bases = fit_clusters(stacks, assignment, clusters, rank, method, config, init=bases, seed=seed)
    return ClusterResult(assignment, bases, costs, rounds, converged, history)
