"""SYNTHETIC LoRA collections with planted structure, for tests and benchmarks only.

These are not trained adapters. Each adapter belongs to one of K latent groups; for every module,
group k has its own random orthonormal subspaces U_k [d_out, q], V_k [d_in, q], and an adapter of
group k is B = s·(U_k C + noise), A = D V_kᵀ + noise with random C [q, r0], D [r0, q] and a
per-adapter scale s (log-normal, mimicking different α/r and norms). Jointly compressing a group
at rank >= q is then nearly exact, and clustering has K groups to find.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from compression.jd import random_basis
from compression.lora_io import LoraAdapter


@dataclass(frozen=True)
class SyntheticCollection:
    """Synthetic adapters and the planted group of each (labels[i] in [0, K))."""

    adapters: list[LoraAdapter]
    labels: list[int]


def synthetic_collection(
    n: int,
    module_shapes: Mapping[str, tuple[int, int]],
    clusters: int = 1,
    r0: int = 8,
    latent_rank: int | None = None,
    noise: float = 0.05,
    scale_spread: float = 0.5,
    seed: int = 0,
    base_model: str = "synthetic",
) -> SyntheticCollection:
    """Generate n synthetic rank-r0 adapters over `module_shapes` from `clusters` latent subspaces.

    noise is the Frobenius norm of the perturbation of each factor relative to its signal;
    latent_rank q (default r0) is the dimension of each group's shared subspaces.
    """
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, n={n}], got {clusters}")
    q = latent_rank or r0
    g = torch.Generator().manual_seed(seed)
    labels = [i % clusters for i in torch.randperm(n, generator=g).tolist()]
    subspaces = {
        m: [(random_basis(d_out, q, g), random_basis(d_in, q, g)) for _ in range(clusters)]
        for m, (d_out, d_in) in module_shapes.items()
    }
    adapters = []
    for i, k in enumerate(labels):
        scale = float(torch.exp(scale_spread * torch.randn(1, generator=g)))
        factors = {}
        for m, (d_out, d_in) in module_shapes.items():
            U, V = subspaces[m][k]
            B = U @ torch.randn(q, r0, generator=g) + noise * (q / d_out) ** 0.5 * torch.randn(
                d_out, r0, generator=g
            )
            A = torch.randn(r0, q, generator=g) @ V.T + noise * (q / d_in) ** 0.5 * torch.randn(
                r0, d_in, generator=g
            )
            factors[m] = (scale * B, A)
        adapters.append(
            LoraAdapter(
                name=f"synthetic-{i:04d}",
                factors=factors,
                base_model=base_model,
                target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in module_shapes})),
                rank=r0,
            )
        )
    return SyntheticCollection(adapters=adapters, labels=labels)
