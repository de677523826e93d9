"""The bank layers' arithmetic, free of vLLM: token grouping by basis and the grouped delta.

Kept apart from :mod:`serve_app.vllm_plugin.bank_layers` (which subclasses vLLM's LoRA layers) so
it is unit-tested in milliseconds against ``compression.bank_delta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """Tokens of one forward that use one basis: their rows in the batch and their slots."""

    basis: int
    rows: Tensor  # [m] long
    slots: Tensor  # [m] long


class SlotTable:
    """Slot -> basis id for one model's LoRA slots, the installed basis ids, and the per-forward plan.

    One instance is shared by every bank layer of a model (kept on their common punica wrapper).
    """

    def __init__(self, max_loras: int, device: torch.device | str):
        self.basis = torch.full((max_loras,), -1, dtype=torch.long, device=device)
        self.installed: set[int] = set()
        self.epoch = 0
        self._cached: tuple[int, Tensor, list[Group]] | None = None

    def assign(self, slot: int, basis_id: int) -> None:
        if int(self.basis[slot]) != basis_id:
            self.basis[slot] = basis_id
            self.epoch += 1

    def changed(self) -> None:
        """Installed bases changed: plans must be rebuilt."""
        self.epoch += 1

    def plan(self, indices: Tensor) -> list[Group]:
        """Group the batch's tokens by basis (``indices``: slot per token, −1 = no adapter).

        Computed once per distinct (indices, slot table) and reused by every layer of the forward.
        """
        cached = self._cached
        if (cached is not None and cached[0] == self.epoch and cached[1].shape == indices.shape
                and torch.equal(cached[1], indices)):
            return cached[2]
        groups: list[Group] = []
        active = (indices >= 0).nonzero().squeeze(1)
        if active.numel():
            slots = indices[active]
            basis = self.basis[slots]
            for b in basis.unique().tolist():
                if b < 0:  # slot holding a warm-up (all-zero) LoRA: no delta
                    continue
                if b not in self.installed:
                    raise RuntimeError(f"bank basis {b} is used by an active LoRA slot but is not installed in this "
                                       "worker (dropped while a request still used it?); this is a bug in the "
                                       "host's basis bookkeeping")
                sel = basis == b
                groups.append(Group(b, active[sel], slots[sel]))
        self._cached = (self.epoch, indices.clone(), groups)
        return groups


def slot_table(punica_wrapper, max_loras: int, device) -> SlotTable:
    """The SlotTable shared by the bank layers that use ``punica_wrapper`` (created on first use)."""
    table = getattr(punica_wrapper, "_atelier_slot_table", None)
    if table is None:
        table = SlotTable(max_loras, device)
        punica_wrapper._atelier_slot_table = table
    return table


def add_grouped_delta(out: Tensor, x: Tensor, U: Tensor, V: Tensor, sigma: Tensor, groups: list[Group]) -> None:
    """``out[rows] += U_g Σ_slot V_gᵀ x[rows]`` for every group (in place; ``out`` may be a column slice).

    x [T, d_in]; U [G, d_out, R]; V [G, d_in, R] (basis tables); sigma [S, R, R] (per slot).
    A group whose basis has no row in this table (module absent from that bank) adds nothing.
    """
    for g in groups:
        if g.basis >= U.shape[0]:
            continue
        h = x[g.rows].to(V.dtype) @ V[g.basis]  # [m, R]: shared shrink
        h = torch.bmm(h[:, None, :], sigma[g.slots].transpose(1, 2))[:, 0]  # h Σᵀ per token
        out[g.rows] += (h @ U[g.basis].T).to(out.dtype)  # shared expand
