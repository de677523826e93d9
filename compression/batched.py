"""Serve a whole bank in one batch: every row of a batch may use a different compressed adapter.

For one module, row x with adapter i in cluster c gets ΔW_i x = U_c Σ_i V_cᵀ x, computed for all
rows of a cluster at once: h = x V_c (shared shrink GEMM), h ← h Σ_iᵀ (a gathered r×r bmm per
row, or h ⊙ σ_i for JD-Diag), y += h U_cᵀ (shared expand GEMM). Rows with index −1 get no delta.

`BankLinear` wraps an nn.Linear like peft's lora.Linear (base_layer + delta); `attach_bank`
wraps every bank module of a HF model, and `handle.using(adapters)` sets the per-row adapters
for the forwards inside the `with` block (`handle.using_one(adapter)`: one adapter for every row
of any batch size, e.g. a shared-prefix forward whose prefix runs with batch 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compression.bank import Bank, ModuleBank


def bank_delta(
    x: Tensor, U: Tensor, V: Tensor, sigma: Tensor, clusters: Tensor, indices: Tensor, method: str | None = None
) -> Tensor:
    """Per-row ΔW_{indices[row]} x for one module, batched by cluster.

    x [N, d_in] or [N, T, d_in]; U [K, d_out, r]; V [K, d_in, r]; sigma [n, r, r] (full), [n, r]
    (diag) or [n, r, 2R] (lowrank: P | Q, pass method="lowrank"); clusters [n] (adapter -> cluster);
    indices [N] adapter per row, −1 = none. Returns [N, d_out] or [N, T, d_out].
    """
    N, d_out = x.shape[0], U.shape[1]
    if indices.shape != (N,):
        raise ValueError(
            f"indices must have one adapter id per batch row: shape ({N},), got {tuple(indices.shape)}"
        )
    if (indices >= sigma.shape[0]).any() or (indices < -1).any():
        raise ValueError(f"adapter indices must be in [-1, {sigma.shape[0]}), got {indices.tolist()}")
    rows_x = x.reshape(N, -1, x.shape[-1])  # [N, T, d_in]
    out = rows_x.new_zeros(N, rows_x.shape[1], d_out)
    rows = (indices >= 0).nonzero().squeeze(1)
    row_cluster = clusters[indices[rows]]
    for c in row_cluster.unique().tolist():
        sel = rows[row_cluster == c]
        adapter = indices[sel]
        h = rows_x[sel] @ V[c]  # [m, T, r]
        if method == "lowrank":  # h Σᵀ = (h Q) Pᵀ through the rank-R core
            R = sigma.shape[2] // 2
            h = (h @ sigma[adapter][..., R:]) @ sigma[adapter][..., :R].mT
        elif sigma.dim() == 3:
            h = h @ sigma[adapter].mT
        else:
            h = h * sigma[adapter][:, None, :]
        out[sel] = h @ U[c].T
    return out.reshape(*x.shape[:-1], d_out)


@dataclass
class AdapterSelection:
    """The per-row adapter ids every BankLinear of one model reads (None = bank off)."""

    indices: Tensor | None = None
    broadcast: bool = False  # indices has one entry, applied to every row of every forward


class BankLinear(nn.Module):
    """nn.Linear + per-row compressed LoRA delta: y = base_layer(x) + ΔW_{idx[row]} x."""

    def __init__(
        self,
        base_layer: nn.Linear,
        module: ModuleBank,
        clusters: Tensor,
        selection: AdapterSelection,
        method: str | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        self.register_buffer("U", module.U.to(w), persistent=False)
        self.register_buffer("V", module.V.to(w), persistent=False)
        self.register_buffer("sigma", module.sigma.to(w), persistent=False)
        self.register_buffer("clusters", clusters.to(w.device), persistent=False)
        self.selection = selection
        self.method = method

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        indices = self.selection.indices
        if indices is None:
            return result
        if self.selection.broadcast:
            indices = indices.expand(x.shape[0])
        delta = bank_delta(
            x.to(self.U.dtype), self.U, self.V, self.sigma, self.clusters, indices.to(x.device), self.method
        )
        return result + delta.to(result.dtype)


@dataclass
class BankHandle:
    """A bank attached to a model: choose per-row adapters with `using`, undo with `detach`."""

    model: nn.Module
    bank: Bank
    layers: dict[str, BankLinear]
    selection: AdapterSelection = field(default_factory=AdapterSelection)

    def indices_for(self, adapters: Sequence[int | str | None]) -> Tensor:
        """Adapter names / row indices (None or −1 = base model only) -> index tensor [N]."""
        ids = [-1 if a is None else self.bank.index(a) if isinstance(a, str) else int(a) for a in adapters]
        bad = [i for i in ids if not -1 <= i < len(self.bank.adapters)]
        if bad:
            raise ValueError(f"adapter indices {bad} out of range [-1, {len(self.bank.adapters)})")
        return torch.tensor(ids, dtype=torch.long)

    @contextmanager
    def using(self, adapters: Sequence[int | str | None]) -> Iterator[None]:
        """Within the block, batch row j uses adapters[j] in every wrapped Linear."""
        with self._select(self.indices_for(adapters), broadcast=False):
            yield

    @contextmanager
    def using_one(self, adapter: int | str | None) -> Iterator[None]:
        """Within the block, every row of every forward (any batch size) uses `adapter`."""
        with self._select(self.indices_for([adapter]), broadcast=True):
            yield

    @contextmanager
    def _select(self, indices: Tensor, broadcast: bool) -> Iterator[None]:
        previous = self.selection.indices, self.selection.broadcast
        self.selection.indices, self.selection.broadcast = indices, broadcast
        try:
            yield
        finally:
            self.selection.indices, self.selection.broadcast = previous

    def detach(self) -> None:
        """Put the original nn.Linear layers back."""
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        self.layers = {}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach_bank(model: nn.Module, bank: Bank) -> BankHandle:
    """Wrap every bank module of `model` (names as in model.named_modules()) in a BankLinear."""
    handle = BankHandle(model=model, bank=bank, layers={})
    clusters = torch.tensor(bank.clusters, dtype=torch.long)
    for name, module in bank.modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"bank module '{name}' is not in the model; was the bank built for this base model "
                f"({bank.base_model!r})?"
            ) from None
        if type(layer) is not nn.Linear:
            raise ValueError(
                f"bank module '{name}' is a {type(layer).__name__}, expected nn.Linear "
                "(already attached? call handle.detach() first)"
            )
        if (layer.out_features, layer.in_features) != module.shape:
            raise ValueError(
                f"bank module '{name}' has shape {module.shape}, the model's Linear is "
                f"{(layer.out_features, layer.in_features)}"
            )
    for name, module in bank.modules.items():
        wrapped = BankLinear(model.get_submodule(name), module, clusters, handle.selection, bank.method)
        _set_submodule(model, name, wrapped)
        handle.layers[name] = wrapped
    return handle
