"""Bank LoRA layers: vLLM linear LoRA layers that hold cluster bases once and Σ_i per slot.

vLLM's LoRA layers keep, per slot, a full ``A [r, d_in]`` and ``B [d_out, r]`` and compute
``y += x Aᵀ Bᵀ`` per token. A compressed bank adapter is ``ΔW_i = U_c Σ_i V_cᵀ`` with U_c, V_c
shared by every adapter of cluster c. These layers keep, per module (per slice of a packed
module such as ``qkv_proj``):

* basis tables ``U [G, d_out, R]``, ``V [G, d_in, R]``: row g = the cluster basis the host
  installed as basis id g (:class:`serve_app.vllm_plugin.bank_host.BankHost`), zero-padded to
  R = ``max_lora_rank``; installed once, shared by every adapter of the cluster;
* per slot only ``Σ [R, R]`` (filled by ``set_lora`` from the Σ-only payload,
  :mod:`serve_app.vllm_plugin.bank_payload`); which basis a slot uses is one shared
  :class:`SlotTable` entry.

Forward, per module: tokens are grouped by basis once per forward (:meth:`SlotTable.plan`, reused
by every layer), then per group ``h = x V_g`` (one GEMM), ``h ← h Σ_slotᵀ`` (a batched r×r
product per token), ``y += h U_gᵀ`` (one GEMM). Tokens without adapter (slot index −1) get
nothing: vLLM's CPU ``bgmv`` ops read index −1 as the last slot, this code never does.

The ``lora_a_stacked`` / ``lora_b_stacked`` attributes vLLM's dummy-LoRA warm-up reads for shapes
are zero-stride views (no memory). Only Σ payloads and all-zero (warm-up) LoRAs are accepted; a
dense LoRA on a bank engine is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

from serve_app.vllm_plugin.bank_math import SlotTable, add_grouped_delta, slot_table
from serve_app.vllm_plugin.bank_payload import decode_header
from serve_app.vllm_plugin.options import current_options


class BankLayerMixin:
    """Turns a vLLM linear LoRA layer into a bank layer (see the module docstring)."""

    # ---------------------------------------------------------------- vLLM's LoRA layer interface
    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        self.lora_config = lora_config
        rank, dtype = lora_config.max_lora_rank, lora_config.lora_dtype
        sizes = self.bank_slice_sizes()
        zero = torch.zeros((), dtype=dtype, device=self.device)
        # Shapes for vLLM's dummy-LoRA warm-up only: zero-stride views, no memory.
        self.lora_a_stacked = tuple(zero.expand(max_loras, 1, rank, self.input_size) for _ in sizes)
        self.lora_b_stacked = tuple(zero.expand(max_loras, 1, size, rank) for size in sizes)
        self.output_slices = tuple(sizes)
        self.bank_max_loras, self.bank_rank, self.bank_dtype = max_loras, rank, dtype
        self.bank_sigma = [torch.zeros(max_loras, rank, rank, dtype=dtype, device=self.device) for _ in sizes]
        self.bank_U = [torch.zeros(0, size, rank, dtype=dtype, device=self.device) for size in sizes]
        self.bank_V = [torch.zeros(0, self.input_size, rank, dtype=dtype, device=self.device) for _ in sizes]

    def reset_lora(self, index: int) -> None:
        for sigma in self.bank_sigma:
            sigma[index] = 0

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        self.reset_lora(index)
        a_list = lora_a if isinstance(lora_a, list) else [lora_a]
        b_list = lora_b if isinstance(lora_b, list) else [lora_b]
        if len(a_list) != len(self.bank_sigma) or len(b_list) != len(self.bank_sigma):
            raise ValueError(f"{type(self).__name__}: got {len(a_list)} LoRA slices for a module with "
                             f"{len(self.bank_sigma)}; bank payloads carry one Σ per packed sub-module")
        for s, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            if a is None or b is None:
                continue
            basis = decode_header(b)
            if basis is None:
                if not bool(a.any()) and not bool(b.any()):
                    continue  # vLLM's warm-up LoRA (all zeros): no delta, exactly as a dense layer would do
                raise ValueError("this vLLM engine serves the Atelier bank (plugin option bank=true) and accepts "
                                 "only bank payloads written by BankHost; got a dense LoRA. Fix: serve dense "
                                 "adapters on an engine without the bank option, or add them to the bank")
            self._table().assign(index, basis)
            sigma = torch.diag_embed(a[0]) if a.shape[0] == 1 else a
            r = sigma.shape[-1]
            if r > self.bank_rank:
                raise ValueError(f"bank payload rank {r} exceeds max_lora_rank {self.bank_rank}")
            self.bank_sigma[s][index, :r, :r].copy_(sigma)

    def apply(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if getattr(self, "_enable_aux_cuda_stream", False):  # the dual-stream path calls punica directly
            return self._apply_sync(x, bias)
        return super().apply(x, bias)

    def _apply_lora_to_output(self, x: Tensor, output: Tensor) -> Tensor:
        if self.punica_wrapper.indices_len[0] is None:  # no LoRA mapping set yet (nothing active)
            return output
        flat_x = x.reshape(-1, x.shape[-1])
        groups = self._table().plan(self.punica_wrapper.token_lora_indices[: flat_x.shape[0]])
        if not groups:
            return output
        flat_out = output.view(-1, output.shape[-1])
        offset = 0
        for U, V, sigma, size in zip(self.bank_U, self.bank_V, self.bank_sigma, self.output_slices, strict=True):
            add_grouped_delta(flat_out[:, offset:offset + size], flat_x, U, V, sigma, groups)
            offset += size
        return output

    # ---------------------------------------------------------------- bank management (worker extension)
    def bank_slice_sizes(self) -> tuple[int, ...]:
        """Output width of each LoRA slice on this tensor-parallel rank."""
        slices = self.__dict__.get("output_slices")
        return tuple(slices) if slices else (self.output_size,)

    def _table(self) -> SlotTable:
        return slot_table(self.punica_wrapper, self.bank_max_loras, self.device)

    def install_basis(self, basis_id: int, slice_index: int, U: Tensor, V: Tensor) -> None:
        """Install cluster basis ``basis_id`` of one slice: U [d_out, r], V [d_in, r] (full, unsharded)."""
        r = U.shape[1]
        if r > self.bank_rank or V.shape[1] != r:
            raise ValueError(f"basis {basis_id}: rank {r} (V rank {V.shape[1]}) exceeds max_lora_rank "
                             f"{self.bank_rank} or U/V disagree; fix: raise the pool's max_lora_rank")
        if self.tp_size > 1:
            U, V = self._shard(slice_index, U, V)
        s = slice_index
        size = self.bank_U[s].shape[1]
        if tuple(U.shape) != (size, r) or tuple(V.shape) != (self.input_size, r):
            raise ValueError(f"basis {basis_id}: U {tuple(U.shape)} / V {tuple(V.shape)} do not fit this module's "
                             f"slice ({size} x {self.input_size}); was the bank built for another base model?")
        for name in ("bank_U", "bank_V"):
            table = getattr(self, name)[s]
            if table.shape[0] <= basis_id:
                grow = table.new_zeros(basis_id + 1 - table.shape[0], *table.shape[1:])
                getattr(self, name)[s] = torch.cat([table, grow])
        self.bank_U[s][basis_id].zero_()
        self.bank_V[s][basis_id].zero_()
        self.bank_U[s][basis_id, :, :r].copy_(U)
        self.bank_V[s][basis_id, :, :r].copy_(V)

    def drop_basis(self, basis_id: int) -> None:
        for s in range(len(self.bank_U)):
            if basis_id < self.bank_U[s].shape[0]:
                self.bank_U[s][basis_id].zero_()
                self.bank_V[s][basis_id].zero_()

    def _shard(self, s: int, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's part of a basis, cut exactly as vLLM cuts a dense LoRA's B (=U) and A (=Vᵀ)."""
        merged = isinstance(self, MergedColumnParallelLinearWithLoRA)
        n = len(self.bank_U)
        if merged:
            U = self.slice_lora_b([U if i == s else None for i in range(n)])[s]
            Vt = self.slice_lora_a([V.T if i == s else None for i in range(n)])[s]
        else:
            U, Vt = self.slice_lora_b(U), self.slice_lora_a(V.T)
        return U, Vt.T

    def bank_bytes(self) -> dict[str, int]:
        """Bytes this layer holds: bases (all installed clusters) and Σ slots."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        return {"bases": size(self.bank_U) + size(self.bank_V), "slots": size(self.bank_sigma)}


def _bank_class(vllm_cls: type[BaseLinearLayerWithLoRA]) -> type:
    def can_replace_layer(cls, source_layer, lora_config, packed_modules_list, model_config=None, **kwargs) -> bool:
        if not current_options().bank:
            return False
        if lora_config.fully_sharded_loras:
            raise ValueError("the Atelier bank layers do not support fully_sharded_loras; fix: leave it off")
        return vllm_cls.can_replace_layer(source_layer=source_layer, lora_config=lora_config,
                                          packed_modules_list=packed_modules_list, model_config=model_config)

    name = "Bank" + vllm_cls.__name__.replace("WithLoRA", "")
    return type(name, (BankLayerMixin, vllm_cls), {"can_replace_layer": classmethod(can_replace_layer),
                                                   "__module__": __name__})


# Same relative order as vLLM's _all_lora_classes (more specific wrappers first there too).
BANK_LAYER_CLASSES: tuple[type, ...] = tuple(_bank_class(c) for c in (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
))


def install_bank_layers() -> None:
    """Put the bank layer classes first in vLLM's ``_all_lora_classes`` (idempotent)."""
    import vllm.lora.utils as lora_utils

    rest = tuple(c for c in lora_utils._all_lora_classes if c not in BANK_LAYER_CLASSES)
    lora_utils._all_lora_classes = BANK_LAYER_CLASSES + rest
