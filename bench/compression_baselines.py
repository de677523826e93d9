"""SHARE (arXiv 2602.06043) as the published packages implement it, for bench/compression.py.

* ``lorashare`` (PyPI, 0.1.3): per (module, side A/B), PCA of the adapters' factor columns
  (feature dim × n·r, centred); k shared components per side and per-adapter loadings k×r per side;
  an adapter is rebuilt as B' = C_B L_B, A' = (C_A L_A)ᵀ. New adapters: projection onto the
  components (``SHAREModel.add_adapter``'s fast path). Its README cites ``calculate_eigenflux()``
  of the SHARE code; this is the line the bench calls SHARE.
* ``vlora-dev`` (PyPI, 1.0.0): per (module, side), PCA over the adapters' *flattened* factor
  matrices (n samples of r·d numbers), k components of r·d numbers each, a k-vector per adapter
  and side. It assumes the adapters' factors are aligned (same initialisation); independently
  trained LoRAs are not, which the bench reports next to its numbers.

Both reconstructions are evaluated exactly like every Atelier bank: the rebuilt factors go into an
exact bank (``compression.svd_bank`` at the LoRA rank) and through ``attach_bank``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHARE_PACKAGES = {"lorashare": "0.1.3", "vlora-dev": "1.0.0"}


@dataclass
class Baseline:
    """A fitted baseline: the rebuilt adapters (served through an exact bank) and what it stores."""

    label: str
    method: str
    k: int
    adapters: list  # compression.LoraAdapter, rebuilt
    stored_params: int
    fit_wall_s: float
    fit_cpu_s: float
    add_one_s: list[float]  # seconds to add one new adapter, per timed adapter


def installed_versions() -> dict[str, str | None]:
    """Installed version of each SHARE package (None if missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in SHARE_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def lorashare_baseline(adapter_dirs: dict[str, Path], adapters: list, k: int, add_dirs: dict[str, Path],
                       shapes: dict) -> Baseline:
    """SHARE via lorashare with k components: fit on ``adapter_dirs`` (name -> PEFT dir, same order as
    ``adapters``), rebuild every adapter, time adding each of ``add_dirs`` (projection path)."""
    from lorashare import SHAREModel

    from compression import load_peft_adapter

    share, wall, cpu = _timed(lambda: SHAREModel.from_adapters({n: str(d) for n, d in adapter_dirs.items()},
                                                               num_components=k, device="cpu"))
    stored = sum(t.numel() for t in share.components.values()) + sum(
        t.numel() for loadings in share.all_loadings.values() for t in loadings.values())
    rebuilt = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in adapter_dirs:
            share.reconstruct(name, output_dir=Path(tmp) / "r")
            rebuilt.append(load_peft_adapter(Path(tmp) / "r", name=name, base_shapes=shapes))
    add_s = []
    for name, d in add_dirs.items():
        t = time.perf_counter()
        share.add_adapter(str(d), name=f"new-{name}", variance_threshold=0.0)  # the projection path
        add_s.append(time.perf_counter() - t)
    return Baseline(f"SHARE (lorashare) k={k}", "share", k, rebuilt, stored, wall, cpu, add_s)


def vlora_baseline(adapters: list, k: int, add: list) -> Baseline:
    """SHARE via vlora-dev with k components on the adapters' (α/r-folded) factors."""
    from vlora import SharedSubspace
    from vlora.io import LoRAWeights

    from compression import LoraAdapter

    def weights(adapter) -> LoRAWeights:
        modules = sorted(adapter.factors)
        return LoRAWeights(layer_names=modules, lora_a={m: adapter.factors[m][1] for m in modules},
                           lora_b={m: adapter.factors[m][0] for m in modules}, rank=max(adapter.ranks.values()))

    subspace, wall, cpu = _timed(lambda: SharedSubspace.from_adapters(
        [weights(a) for a in adapters], task_ids=[a.name for a in adapters], num_components=k))
    stored = sum(subspace.components_a[m].numel() + subspace.components_b[m].numel() + subspace.means_a[m].numel()
                 + subspace.means_b[m].numel() for m in subspace.layer_names) + sum(
        t.numel() for task in subspace.tasks.values() for t in (*task.loadings_a.values(), *task.loadings_b.values()))
    rebuilt = []
    for adapter in adapters:
        w = subspace.reconstruct(adapter.name)
        rebuilt.append(LoraAdapter(name=adapter.name, factors={m: (w.lora_b[m], w.lora_a[m]) for m in w.layer_names},
                                   base_model=adapter.base_model, target_modules=adapter.target_modules,
                                   rank=adapter.rank))
    add_s = []
    for adapter in add:
        t = time.perf_counter()
        subspace.add_task(subspace.project(weights(adapter), f"new-{adapter.name}"))
        add_s.append(time.perf_counter() - t)
    return Baseline(f"SHARE (vlora-dev) k={k}", "vlora", k, rebuilt, stored, wall, cpu, add_s)


def rebuild_errors(originals: list, rebuilt: list) -> list[dict[str, float]]:
    """Per adapter and module: ‖ΔW − ΔW'‖² / ‖ΔW‖² of the rebuilt factors, from the factors only
    (⟨B A, B' A'⟩ = tr((BᵀB')(A' Aᵀ)))."""
    out = []
    for orig, new in zip(originals, rebuilt, strict=True):
        errors = {}
        for m, (B, A) in orig.factors.items():
            B2, A2 = new.factors[m]
            norm = float(((B.T @ B) * (A @ A.T)).sum())
            cross = float(((B.T @ B2) * (A @ A2.T)).sum())
            norm2 = float(((B2.T @ B2) * (A2 @ A2.T)).sum())
            errors[m] = max(norm - 2 * cross + norm2, 0.0) / norm if norm > 0 else 0.0
        out.append(errors)
    return out


def rebuilt_bank(baseline: Baseline, rank: int, model):
    """The rebuilt adapters as an exact bank (per-adapter SVD at the LoRA rank), for attach_bank."""
    from compression import svd_bank

    return svd_bank(baseline.adapters, rank, base_model=model.id, base_model_hash=model.content_hash)


def jd_add_times(bank, adapters: list, budget: float) -> dict[str, list[float]]:
    """Seconds to add each adapter (renamed as new) to a fitted Atelier bank: projection only
    (``add_adapter``) and the serving path (``add_within_budget``: projection, exact if over budget)."""
    from dataclasses import replace

    from compression import add_adapter, add_within_budget

    out = {"projection": [], "within_budget": []}
    for adapter in adapters:
        new = replace(adapter, name=f"new-{adapter.name}")
        t = time.perf_counter()
        add_adapter(bank, new, check_base_model=False)
        out["projection"].append(time.perf_counter() - t)
        t = time.perf_counter()
        add_within_budget(bank, new, budget, check_base_model=False)
        out["within_budget"].append(time.perf_counter() - t)
    return out


def svd_add_times(adapters: list, rank: int) -> list[float]:
    """Seconds to add one adapter to the per-adapter SVD baseline (its own truncated SVD)."""
    from compression.factors import stack_factors
    from compression.jd import svd_truncate

    out = []
    for adapter in adapters:
        t = time.perf_counter()
        for B, A in adapter.factors.values():
            svd_truncate(stack_factors([(B, A)], B.shape[0], A.shape[1]), min(rank, B.shape[1]))
        out.append(time.perf_counter() - t)
    return out


def median(values: list[float]) -> float:
    return float(torch.tensor(values).median()) if values else float("nan")
