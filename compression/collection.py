"""Top-level API: compress a collection of LoRA adapters into a Bank, grow it, export from it.

- `compress_collection`: cluster + jointly compress n adapters (per module, one assignment each).
- `svd_bank`: the per-adapter SVD baseline (no sharing) in the same Bank form.
- `add_adapter`: project a new adapter onto the best existing cluster (closed form, no refit).
- `adapter_factors` / `export_adapter`: materialise adapter i as B' = U_c Σ_i, A' = V_cᵀ (rank r),
  in memory or as a standard PEFT directory.
- `collection_param_count` vs `bank_param_count` (bank.py) gives the compression ratio.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from compression.bank import Bank, ModuleBank
from compression.clustering import Bases, ProgressFn, assignment_costs, cluster_adapters
from compression.factors import FactorStack, stack_factors
from compression.jd import JDConfig, Method, pad_core, project_with_error, svd_truncate
from compression.lora_io import Factors, LoraAdapter, ModuleShapes, save_peft_adapter, validate_adapter


def collection_param_count(adapters: Sequence[LoraAdapter]) -> int:
    """Numbers stored by the uncompressed adapters: Σ_adapters Σ_modules r_i·(d_out + d_in)."""
    return sum(B.numel() + A.numel() for a in adapters for B, A in a.factors.values())


def shapes_fingerprint(shapes: ModuleShapes) -> str:
    """A short architecture id from module names and shapes (default base_model_hash)."""
    text = json.dumps(sorted((m, list(s)) for m, s in shapes.items()))
    return "shapes-sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _module_shapes(adapters: Sequence[LoraAdapter]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for module, shape in adapter.shapes.items():
            if shapes.setdefault(module, shape) != shape:
                raise ValueError(
                    f"adapter '{adapter.name}': module '{module}' has ΔW shape {shape} but another "
                    f"adapter has {shapes[module]}; all adapters must share one base model"
                )
    return dict(sorted(shapes.items()))


def _stacks(adapters: Sequence[LoraAdapter], shapes: ModuleShapes) -> dict[str, FactorStack]:
    return {m: stack_factors([a.factors.get(m) for a in adapters], *shape) for m, shape in shapes.items()}


def _prepare(
    adapters: Sequence[LoraAdapter], caller: str, base_model: str | None, base_shapes: ModuleShapes | None
) -> tuple[list[str], str, dict[str, tuple[int, int]], dict[str, FactorStack]]:
    """Validate a collection (unique names, one base model, shapes) -> names, base model, shapes, stacks."""
    if not adapters:
        raise ValueError(f"{caller}: adapters is empty")
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{caller}: adapter names must be unique, duplicates: "
            f"{sorted({n for n in names if names.count(n) > 1})}"
        )
    if base_model is None:
        declared = sorted({a.base_model for a in adapters if a.base_model})
        if len(declared) > 1:
            raise ValueError(
                f"adapters declare different base models {declared}; pass base_model=... if they "
                "are the same model under different names"
            )
        base_model = declared[0] if declared else ""
    if base_shapes is not None:
        for adapter in adapters:
            validate_adapter(adapter, base_shapes)
    shapes = _module_shapes(adapters)
    return names, base_model, shapes, _stacks(adapters, shapes)


def _bank_bases(bank: Bank) -> Bases:
    return {m: (mb.U, mb.V) for m, mb in bank.modules.items()}


def _coefficients(
    stacks: Mapping[str, FactorStack], bases: Bases, clusters: Sequence[int], method: Method
) -> tuple[dict[str, Tensor], list[dict[str, float]]]:
    """Σ_i of every adapter on its own cluster's basis, and its per-module squared relative error."""
    sigmas, errors = {}, [{} for _ in clusters]
    for module, stack in stacks.items():
        U, V = bases[module]
        for c in sorted(set(clusters)):
            members = [i for i, ci in enumerate(clusters) if ci == c]
            sigma, error = project_with_error(stack.select(members), U[c], V[c], method)
            if module not in sigmas:
                sigmas[module] = sigma.new_zeros(stack.n, *sigma.shape[1:])
            sigmas[module][members] = sigma
            for i, e in zip(members, error.tolist(), strict=True):
                errors[i][module] = e
    return sigmas, errors


def compress_collection(
    adapters: Sequence[LoraAdapter],
    rank: int,
    clusters: int = 1,
    method: Method = "full",
    seed: int = 0,
    *,
    config: JDConfig | None = None,
    max_rounds: int = 10,
    base_shapes: ModuleShapes | None = None,
    base_model: str | None = None,
    base_model_hash: str | None = None,
    progress: ProgressFn | None = None,
    init_clusters: Sequence[int] | None = None,
) -> Bank:
    """Jointly compress `adapters` into a Bank of `clusters` shared bases of rank `rank` per module.

    Adapters may target different module subsets (a missing module is ΔW = 0). `base_shapes`
    (see lora_io.linear_shapes) validates modules against the base model. `base_model` overrides
    the adapters' base_model_name_or_path, which must otherwise agree. `progress(stage, done,
    total)` is called per k-means++ seed ("seed") and per clustering round ("cluster").
    `init_clusters` (one id per adapter, e.g. a grown bank's `clusters`) starts the clustering
    there instead of at k-means++ seeds: the offline re-clustering path.
    """
    names, base_model, shapes, stacks = _prepare(adapters, "compress_collection", base_model, base_shapes)
    result = cluster_adapters(
        stacks, rank, clusters, method, seed, config, max_rounds, progress, init_clusters
    )
    sigmas, errors = _coefficients(stacks, result.bases, result.assignment, method)
    return Bank(
        base_model=base_model,
        base_model_hash=base_model_hash or shapes_fingerprint(shapes),
        method=method,
        rank=rank,
        num_clusters=clusters,
        adapters=names,
        clusters=result.assignment,
        recon_error={name: err for name, err in zip(names, errors, strict=True)},
        modules={m: ModuleBank(U=result.bases[m][0], V=result.bases[m][1], sigma=sigmas[m]) for m in shapes},
    )


def svd_bank(
    adapters: Sequence[LoraAdapter],
    rank: int,
    *,
    base_shapes: ModuleShapes | None = None,
    base_model: str | None = None,
    base_model_hash: str | None = None,
) -> Bank:
    """The per-adapter SVD baseline as a Bank: one cluster per adapter, ΔW_i ≈ U_i diag(s_i) V_iᵀ.

    Each adapter keeps its own top-`rank` singular triplets per module (no sharing), so it costs
    about rank/r_i of the original; with `rank` >= every LoRA rank it is the original collection,
    exactly, in bank form (served by the same BankLinear op as a compressed bank). Modules whose
    LoRA rank is below `rank` are zero-padded.
    """
    names, base_model, shapes, stacks = _prepare(adapters, "svd_bank", base_model, base_shapes)
    modules, errors = {}, [{} for _ in names]
    for module, stack in stacks.items():
        fit = svd_truncate(stack, rank)
        pad = rank - fit.s.shape[1]
        modules[module] = ModuleBank(
            U=torch.nn.functional.pad(fit.U, (0, pad)),
            V=torch.nn.functional.pad(fit.V, (0, pad)),
            sigma=torch.nn.functional.pad(fit.s, (0, pad)),
        )
        for i, e in enumerate(fit.error.tolist()):
            errors[i][module] = e
    return Bank(
        base_model=base_model,
        base_model_hash=base_model_hash or shapes_fingerprint(shapes),
        method="diag",
        rank=rank,
        num_clusters=len(names),
        adapters=names,
        clusters=list(range(len(names))),
        recon_error={name: err for name, err in zip(names, errors, strict=True)},
        modules=modules,
    )


def check_addable(bank: Bank, adapter: LoraAdapter, check_base_model: bool = True) -> None:
    """Raise ValueError unless `adapter` can join `bank`: a new name, the same base model, known shapes."""
    if adapter.name in bank.adapters:
        raise ValueError(f"adapter '{adapter.name}' is already in the bank; rename it or build a new bank")
    if check_base_model and adapter.base_model and bank.base_model and adapter.base_model != bank.base_model:
        raise ValueError(
            f"adapter '{adapter.name}' is for base model {adapter.base_model!r}, the bank for "
            f"{bank.base_model!r}; pass check_base_model=False if they are the same model"
        )
    validate_adapter(adapter, {m: mb.shape for m, mb in bank.modules.items()})


def add_adapter(bank: Bank, adapter: LoraAdapter, check_base_model: bool = True) -> Bank:
    """A new Bank that also holds `adapter`, projected onto the shared cluster where it fits best (no refit).

    Its error is in the returned bank's recon_error[adapter.name]; a high value means the adapter
    does not share the bank's subspaces: `compression.exact.add_within_budget` then stores it exactly.
    """
    check_addable(bank, adapter, check_base_model)
    shared = bank.shared_clusters
    if not shared:
        raise ValueError(f"the bank has no shared cluster to project '{adapter.name}' onto (every cluster is "
                         "exact); add it with compression.exact.add_exact, or refit the collection")
    shapes = {m: mb.shape for m, mb in bank.modules.items()}
    stacks = _stacks([adapter], shapes)
    index = torch.tensor(shared)
    shared_bases = {m: (U[index], V[index]) for m, (U, V) in _bank_bases(bank).items()}
    cluster = shared[int(assignment_costs(stacks, shared_bases, bank.method).argmin(1))]
    sigmas, errors = _coefficients(stacks, _bank_bases(bank), [cluster], bank.method)
    modules = {}
    for m, mb in bank.modules.items():
        old, new = mb.sigma, sigmas[m].to(mb.sigma.dtype)
        if bank.method == "lowrank":  # cores of one width: the wider of the bank's and the adapter's rank
            R = max(old.shape[-1], new.shape[-1]) // 2
            old, new = pad_core(old, R), pad_core(new, R)
        modules[m] = replace(mb, sigma=torch.cat([old, new]))
    return replace(
        bank,
        adapters=[*bank.adapters, adapter.name],
        clusters=[*bank.clusters, cluster],
        recon_error={**bank.recon_error, adapter.name: errors[0]},
        modules=modules,
    )


def adapter_factors(bank: Bank, name: str) -> dict[str, Factors]:
    """Adapter `name` as LoRA factors per module: B' = U_c Σ_i, A' = V_cᵀ (rank r; lowrank: U_c P_i and
    Q_iᵀ V_cᵀ, rank R); an exact adapter's are its own uploaded factors (its slot, rank = its width)."""
    i = bank.index(name)
    c = bank.clusters[i]
    factors = {}
    for module, mb in bank.modules.items():
        if name in bank.exact:  # its own factors: Σ_i is the identity on its slot
            slot = slice(bank.exact[name][0], sum(bank.exact[name]))
            factors[module] = (mb.U[c][:, slot].clone(), mb.V[c][:, slot].T.contiguous())
        elif bank.method == "lowrank":  # B' = U P_i, A' = Q_iᵀ Vᵀ: rank R, not r
            R = mb.sigma.shape[2] // 2
            factors[module] = (mb.U[c] @ mb.sigma[i][:, :R], (mb.V[c] @ mb.sigma[i][:, R:]).T.contiguous())
        else:
            S = mb.sigma[i] if bank.method == "full" else torch.diag(mb.sigma[i])
            factors[module] = (mb.U[c] @ S, mb.V[c].T.contiguous())
    return factors


def export_adapter(bank: Bank, name: str, path: str | Path) -> Path:
    """Write compressed adapter `name` as a standard PEFT LoRA directory (rank r, scaling 1)."""
    return save_peft_adapter(adapter_factors(bank, name), path, base_model=bank.base_model or None)
