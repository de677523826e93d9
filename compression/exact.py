"""Adapters stored exactly in a bank: served as uploaded until the collection is refit.

A projection onto a bank's shared bases drops whatever of a new adapter lies outside them. When
that error exceeds the pool's budget, the adapter is stored *exactly* instead: its own (α/r-scaled)
factors become columns of an *exact cluster*, U[:, slot] = B_i, V[:, slot] = A_iᵀ, Σ_i = identity
on the slot and 0 elsewhere, so U Σ_i Vᵀ = B_i A_i with no approximation. Several exact adapters
share one exact cluster side by side (first fit by width), so an exact adapter costs the bank
what the uploaded LoRA costs, not a whole rank-r cluster. Exact clusters are ordinary clusters to
``bank_delta`` and ``export_adapter``: every engine that serves a bank serves them unchanged.

- `add_exact`: put one adapter into a free slot (raising the bank's rank, zero-padded, if needed).
- `remove_adapter`: drop one adapter (its slot is freed; a cluster left empty is dropped).
- `add_within_budget`: project, and store exactly if the projection error exceeds the budget.
- `serve_within_budget`: after a (re)fit, store exactly every adapter whose error exceeds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from compression.bank import Bank, ModuleBank
from compression.collection import add_adapter, check_addable, shapes_fingerprint
from compression.jd import pad_core
from compression.lora_io import LoraAdapter, validate_adapter

Served = Literal["compressed", "exact"]
DEFAULT_ERROR_BUDGET = 0.03
"""Largest mean (over modules) squared relative reconstruction error at which an adapter is served
compressed; above it, it is served exactly. Provisional (the old bench's bound for keeping 95 % on
held-out paraphrases was a bank-mean error of 0.026); set from bench/compression.py's per-adapter
measurement on validation paraphrases (docs/bench/compression.md)."""


@dataclass(frozen=True)
class Placement:
    """How `add_within_budget` stored an adapter: served form, its error, and the projection's."""

    served: Served
    recon_error: float  # mean over modules of the served form's squared relative error (0 if exact)
    projection_error: float | None  # the same for the projection onto the shared bases (None: no shared basis)
    budget: float | None


def mean_error(errors: Mapping[str, float]) -> float:
    """Mean over modules of an adapter's squared relative errors (the number budgets compare)."""
    return sum(errors.values()) / max(len(errors), 1)


def adapter_width(adapter: LoraAdapter) -> int:
    """Columns an exact copy of `adapter` needs: its largest LoRA rank over modules."""
    return max(B.shape[1] for B, _ in adapter.factors.values())


def _pad_rank(bank: Bank, rank: int) -> Bank:
    """The same bank at a larger rank: zero columns in U, V and zero rows/columns in Σ (exact)."""
    extra = rank - bank.rank
    if extra <= 0:
        return bank
    pad_sigma = {"full": (0, extra, 0, extra), "diag": (0, extra), "lowrank": (0, 0, 0, extra)}[bank.method]
    modules = {m: ModuleBank(U=F.pad(mb.U, (0, extra)), V=F.pad(mb.V, (0, extra)), sigma=F.pad(mb.sigma, pad_sigma))
               for m, mb in bank.modules.items()}
    return replace(bank, rank=rank, modules=modules)


def _free_offset(bank: Bank, cluster: int, width: int) -> int | None:
    """First column offset in exact cluster `cluster` with `width` free columns, or None."""
    return _first_fit([bank.exact[a] for a, c in zip(bank.adapters, bank.clusters, strict=True)
                       if c == cluster and a in bank.exact], width, bank.rank)


def _first_fit(taken: list[tuple[int, int]], width: int, rank: int) -> int | None:
    """First offset with `width` free columns among `rank` columns of which `taken` (offset, width) are used."""
    start = 0
    for offset, w in sorted(taken):
        if offset - start >= width:
            return start
        start = max(start, offset + w)
    return start if rank - start >= width else None


def _write_slot(U: Tensor, V: Tensor, factors: tuple[Tensor, Tensor] | None, cluster: int, offset: int,
                method: str, core: int = 0) -> Tensor:
    """Write B into U[cluster, :, slot] and Aᵀ into V[cluster, :, slot] (in place); return the adapter's
    Σ row: the identity on the slot, as [1, r, r] (full), [1, r] (diag) or [1, r, 2·core] (lowrank,
    P = Q = the slot's columns of the identity; core >= the slot's width). A module it lacks stays 0."""
    r = U.shape[2]
    width = 0 if factors is None else factors[0].shape[1]
    if factors is not None:
        B, A = factors
        U[cluster, :, offset:offset + width] = B.to(U.dtype)
        V[cluster, :, offset:offset + width] = A.T.to(V.dtype)
    if method == "lowrank":
        E = torch.zeros(r, core, dtype=U.dtype)
        E[offset + torch.arange(width), torch.arange(width)] = 1
        return torch.cat([E, E], dim=1)[None]
    diagonal = torch.zeros(r, dtype=U.dtype)
    diagonal[offset:offset + width] = 1
    return (torch.diag(diagonal) if method == "full" else diagonal)[None]


def add_exact(bank: Bank, adapter: LoraAdapter, check_base_model: bool = True) -> Bank:
    """A new Bank that also holds `adapter` exactly (its own factors in a free exact-cluster slot)."""
    check_addable(bank, adapter, check_base_model)
    width = adapter_width(adapter)
    bank = _pad_rank(bank, width)
    slot = next(((c, o) for c in sorted(bank.exact_clusters) if (o := _free_offset(bank, c, width)) is not None), None)
    cluster, offset = slot if slot is not None else (bank.num_clusters, 0)
    modules = {}
    for m, mb in bank.modules.items():
        if cluster == bank.num_clusters:
            U, V = F.pad(mb.U, (0, 0, 0, 0, 0, 1)), F.pad(mb.V, (0, 0, 0, 0, 0, 1))
        else:
            U, V = mb.U.clone(), mb.V.clone()
        sigma = mb.sigma if bank.method != "lowrank" else pad_core(mb.sigma, width)
        row = _write_slot(U, V, adapter.factors.get(m), cluster, offset, bank.method, sigma.shape[-1] // 2)
        modules[m] = ModuleBank(U=U, V=V, sigma=torch.cat([sigma, row.to(sigma.dtype)]))
    return replace(
        bank,
        num_clusters=max(bank.num_clusters, cluster + 1),
        adapters=[*bank.adapters, adapter.name],
        clusters=[*bank.clusters, cluster],
        recon_error={**bank.recon_error, adapter.name: dict.fromkeys(bank.modules, 0.0)},
        modules=modules,
        exact={**bank.exact, adapter.name: (offset, width)},
    )


def remove_adapter(bank: Bank, name: str) -> Bank | None:
    """The bank without adapter `name` (None if it was the only one); empty clusters are dropped."""
    i = bank.index(name)
    keep = [j for j in range(len(bank.adapters)) if j != i]
    if not keep:
        return None
    clusters = [bank.clusters[j] for j in keep]
    used = sorted(set(clusters))
    renumber = {c: k for k, c in enumerate(used)}
    modules = {m: ModuleBank(U=mb.U[used], V=mb.V[used], sigma=mb.sigma[keep]) for m, mb in bank.modules.items()}
    return replace(
        bank,
        num_clusters=len(used),
        adapters=[bank.adapters[j] for j in keep],
        clusters=[renumber[c] for c in clusters],
        recon_error={a: e for a, e in bank.recon_error.items() if a != name},
        modules=modules,
        exact={a: s for a, s in bank.exact.items() if a != name},
    )


def extend_modules(bank: Bank, shapes: Mapping[str, tuple[int, int]]) -> Bank:
    """The bank with zero bases for every module of `shapes` it lacks (adapters' ΔW there: 0, error 0),
    so an adapter that targets more modules than the bank's can join it. Validate `shapes` against
    the base model first (e.g. ``load_peft_adapter(..., base_shapes=...)``)."""
    new = {m: shape for m, shape in shapes.items() if m not in bank.modules}
    if not new:
        return bank
    n, K, r = len(bank.adapters), bank.num_clusters, bank.rank
    core = max(mb.sigma.shape[-1] for mb in bank.modules.values())  # lowrank: 2R of the widest core
    sigma = {"full": (n, r, r), "diag": (n, r), "lowrank": (n, r, core)}[bank.method]
    modules = {**bank.modules, **{m: ModuleBank(U=torch.zeros(K, d_out, r), V=torch.zeros(K, d_in, r),
                                                sigma=torch.zeros(sigma)) for m, (d_out, d_in) in new.items()}}
    errors = {a: {**e, **dict.fromkeys(new, 0.0)} for a, e in bank.recon_error.items()}
    return replace(bank, modules=dict(sorted(modules.items())), recon_error=errors)


def add_within_budget(
    bank: Bank | None,
    adapter: LoraAdapter,
    budget: float,
    check_base_model: bool = True,
    *,
    base_model: str | None = None,
    base_model_hash: str | None = None,
) -> tuple[Bank, Placement]:
    """Add `adapter` compressed (projected onto the best shared cluster) if its mean projection error is
    <= `budget`, else exactly. `bank` None starts a new bank holding only this adapter (exact), pinned
    to `base_model` / `base_model_hash` when given."""
    if bank is None:
        return exact_bank(adapter, base_model, base_model_hash), Placement("exact", 0.0, None, budget)
    bank = extend_modules(bank, adapter.shapes)
    projection = None
    if bank.shared_clusters:
        projected = add_adapter(bank, adapter, check_base_model)
        projection = mean_error(projected.recon_error[adapter.name])
        if projection <= budget:
            return projected, Placement("compressed", projection, projection, budget)
    return add_exact(bank, adapter, check_base_model), Placement("exact", 0.0, projection, budget)


def exact_bank(adapter: LoraAdapter, base_model: str | None = None, base_model_hash: str | None = None) -> Bank:
    """A bank holding only `adapter`, exactly (one exact cluster at the adapter's rank; JD-Diag layout, so
    each adapter's Σ costs r numbers per module)."""
    width = adapter_width(adapter)
    shapes = dict(sorted(adapter.shapes.items()))
    modules = {}
    for m, (d_out, d_in) in shapes.items():
        U, V = torch.zeros(1, d_out, width), torch.zeros(1, d_in, width)
        modules[m] = ModuleBank(U=U, V=V, sigma=_write_slot(U, V, adapter.factors.get(m), 0, 0, "diag"))
    return Bank(
        base_model=adapter.base_model if base_model is None else base_model,
        base_model_hash=base_model_hash or shapes_fingerprint(shapes),
        method="diag",
        rank=width,
        num_clusters=1,
        adapters=[adapter.name],
        clusters=[0],
        recon_error={adapter.name: dict.fromkeys(shapes, 0.0)},
        modules=modules,
        exact={adapter.name: (0, width)},
    )


def serve_within_budget(bank: Bank, adapters: Sequence[LoraAdapter], budget: float) -> Bank:
    """Store exactly every adapter whose mean error in `bank` exceeds `budget` (after a fit or refit).

    `adapters` must hold the uploaded form of those adapters (matched by name); the others are
    untouched. Shared clusters left without members are dropped. The result equals removing each
    over-budget adapter and adding it back with :func:`add_exact`, one after another, but is built in
    one pass (linear, not quadratic, in the number of adapters: a refit of 1000 adapters stores
    hundreds exactly).
    """
    by_name = {a.name: a for a in adapters}
    over = [a for a in bank.adapters if a not in bank.exact and mean_error(bank.recon_error[a]) > budget]
    missing = [a for a in over if a not in by_name]
    if missing:
        raise ValueError(f"serve_within_budget: need the uploaded factors of {missing[:3]} (over budget {budget})")
    if not over:
        return bank
    if len(bank.adapters) == 1:
        return exact_bank(by_name[over[0]], bank.base_model, bank.base_model_hash)
    return _store_exactly(bank, [by_name[name] for name in over])


def _store_exactly(bank: Bank, moved: list[LoraAdapter]) -> Bank:
    """`bank` with the adapters `moved` (in it, not exact) taken out of their clusters and stored exactly,
    first-fit into free exact-cluster slots, then new exact clusters; appended in the given order."""
    shapes = {m: mb.shape for m, mb in bank.modules.items()}
    for adapter in moved:
        validate_adapter(adapter, shapes)
    names = {a.name for a in moved}
    widths = [adapter_width(a) for a in moved]
    rank = bank.rank  # grows as wider adapters arrive, as one-by-one adds would grow it
    bank = _pad_rank(bank, max(widths))
    keep = [j for j, a in enumerate(bank.adapters) if a not in names]
    used = sorted({bank.clusters[j] for j in keep})
    renumber = {c: k for k, c in enumerate(used)}
    kept_clusters = [renumber[bank.clusters[j]] for j in keep]
    taken: dict[int, list[tuple[int, int]]] = {}
    for j, c in zip(keep, kept_clusters, strict=True):
        if bank.adapters[j] in bank.exact:
            taken.setdefault(c, []).append(bank.exact[bank.adapters[j]])
    slots, next_cluster = [], len(used)
    for width in widths:
        rank = max(rank, width)
        slot = next(((c, o) for c in sorted(taken) if (o := _first_fit(taken[c], width, rank)) is not None), None)
        if slot is None:
            slot, next_cluster = (next_cluster, 0), next_cluster + 1
        taken.setdefault(slot[0], []).append((slot[1], width))
        slots.append(slot)
    modules = {}
    for m, mb in bank.modules.items():
        extra = next_cluster - len(used)
        U = torch.cat([mb.U[used], mb.U.new_zeros(extra, *mb.U.shape[1:])])
        V = torch.cat([mb.V[used], mb.V.new_zeros(extra, *mb.V.shape[1:])])
        sigma = mb.sigma[keep] if bank.method != "lowrank" else pad_core(mb.sigma[keep], max(widths))
        rows = [_write_slot(U, V, a.factors.get(m), c, o, bank.method, sigma.shape[-1] // 2).to(sigma.dtype)
                for a, (c, o) in zip(moved, slots, strict=True)]
        modules[m] = ModuleBank(U=U, V=V, sigma=torch.cat([sigma, *rows]))
    zero = dict.fromkeys(bank.modules, 0.0)
    return replace(
        bank,
        num_clusters=next_cluster,
        adapters=[bank.adapters[j] for j in keep] + [a.name for a in moved],
        clusters=kept_clusters + [c for c, _ in slots],
        recon_error={**{a: e for a, e in bank.recon_error.items() if a not in names}, **{a.name: dict(zero) for a in moved}},
        modules=modules,
        exact={**{a: s for a, s in bank.exact.items() if a not in names},
               **{a.name: (o, w) for a, (_, o), w in zip(moved, slots, widths, strict=True)}},
    )
