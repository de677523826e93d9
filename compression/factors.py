"""Stacked LoRA factors of one (layer, module): the input to every fit in `jd.py`.

n adapters with possibly different ranks r_i are zero-padded to R = max r_i, giving
B [n, d_out, R] and A [n, R, d_in]. Zero padding leaves every product B_i A_i unchanged, so all
algorithms can run batched over adapters. An adapter that does not target the module is a
zero pair (ΔW_i = 0): fits ignore it and its reconstruction error is defined as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from compression.lora_io import Factors


@dataclass(frozen=True)
class FactorStack:
    """B [n, d_out, R] and A [n, R, d_in] (fp32) such that ΔW_i = B[i] @ A[i]."""

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        if (
            self.B.dim() != 3
            or self.A.dim() != 3
            or self.B.shape[0] != self.A.shape[0]
            or self.B.shape[2] != self.A.shape[1]
        ):
            raise ValueError(
                f"FactorStack: need B [n, d_out, R] and A [n, R, d_in], got B {tuple(self.B.shape)} "
                f"and A {tuple(self.A.shape)}"
            )

    @property
    def n(self) -> int:
        return self.B.shape[0]

    @property
    def d_out(self) -> int:
        return self.B.shape[1]

    @property
    def d_in(self) -> int:
        return self.A.shape[2]

    def select(self, index: Sequence[int] | Tensor) -> FactorStack:
        """The sub-stack of the given adapters (e.g. the members of one cluster)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return FactorStack(self.B[index], self.A[index])

    @cached_property
    def sq_norms(self) -> Tensor:
        """‖ΔW_i‖²_F = Σ (BᵀB) ∘ (A Aᵀ), from R×R Gram matrices only. Shape [n]. Computed once."""
        return (self.B.mT @ self.B * (self.A @ self.A.mT)).sum((1, 2))

    def core(self, U: Tensor, V: Tensor) -> Tensor:
        """Uᵀ ΔW_i V = (Uᵀ B_i)(A_i V) for every adapter, shape [n, r_u, r_v]: the building block of JD."""
        return (U.mT @ self.B) @ (self.A @ V)

    def sum_B(self, M: Tensor, w: Tensor) -> Tensor:
        """Σ_i w_i B_i M_i for M [n, R, k] -> [d_out, k] (e.g. Σ_i w_i ΔW_i V with M_i = A_i V)."""
        return torch.einsum("ndR,nRk->dk", self.B, w[:, None, None] * M)

    def sum_At(self, M: Tensor, w: Tensor) -> Tensor:
        """Σ_i w_i A_iᵀ M_i for M [n, R, k] -> [d_in, k] (e.g. Σ_i w_i ΔW_iᵀ U with M_i = B_iᵀ U)."""
        return torch.einsum("nRe,nRk->ek", self.A, w[:, None, None] * M)

    def dense(self) -> Tensor:
        """Dense ΔW [n, d_out, d_in]. For tests and debugging only: algorithms never form it."""
        return self.B @ self.A


def stack_factors(pairs: Sequence[Factors | None], d_out: int, d_in: int) -> FactorStack:
    """Zero-pad and stack per-adapter (B, A) pairs of one module; None means "adapter lacks it"."""
    R = max([B.shape[1] for B, _ in filter(None, pairs)], default=1)
    B = torch.zeros(len(pairs), d_out, R)
    A = torch.zeros(len(pairs), R, d_in)
    for i, pair in enumerate(pairs):
        if pair is None:
            continue
        Bi, Ai = pair
        if Bi.shape[0] != d_out or Ai.shape[1] != d_in:
            raise ValueError(
                f"stack_factors: adapter {i} has ΔW shape ({Bi.shape[0]}, {Ai.shape[1]}), "
                f"expected ({d_out}, {d_in}); all adapters of a module must share the base shape"
            )
        B[i, :, : Bi.shape[1]] = Bi
        A[i, : Ai.shape[0]] = Ai
    return FactorStack(B, A)
