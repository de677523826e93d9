"""Serve a whole bank in one batch: every row of a batch may use a different compressed adapter.

For one module, row x with adapter i in cluster c gets ΔW_i x = U_c Σ_i V_cᵀ x, computed for all
rows of a cluster at once: h = x V_c (shared shrink GEMM), h ← h Σ_iᵀ (a gathered r×r bmm per
row, or h ⊙ σ_i for JD-Diag), y += h U_cᵀ (shared expand GEMM). Rows with index −1 get no delta.

`BankLinear` wraps an nn.Linear like peft's lora.Linear (base_layer + delta); `attach_bank`
wraps every bank module of a HF model, and `handle.using(adapters)` sets the per-row adapters
for the forwards inside the `with` block (`handle.using_one(adapter)`: one adapter for every row
of any batch size, e.g. a shared-prefix forward whose prefix runs with batch 1).

Serving path (`stacked_delta`): per-row work is planned once per selection (`RowPlan`: each row's
cluster as a one-hot mask and its Σ index), not once per module, and a module's delta is a fixed
handful of tensor ops whatever the clusters present: h = x [V_1 … V_K] (one GEMM over all
clusters' bases), keep each row's own cluster block (one-hot mask), apply Σ_i (one batched
matmul), y = (block-placed h) [U_1 … U_K]ᵀ (one GEMM). It spends K× the shrink/expand FLOPs of the
per-cluster loop to replace its Python loop, index juggling and host syncs per module, which is
what dominated on CPU (profiled under bench/serving.py load). Above `STACK_MAX_CLUSTERS` clusters
BankLinear falls back to `bank_delta`.
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


STACK_MAX_CLUSTERS = 8


@dataclass(frozen=True)
class RowPlan:
    """Per-row routing shared by every BankLinear of one forward (computed once per selection)."""

    onehot: Tensor  # [N, K] float: 1 at the row's cluster, all 0 for rows without adapter
    adapter: Tensor  # [N] long: the row's Σ index (0 for rows without adapter; masked by onehot)

    @classmethod
    def build(cls, indices: Tensor, clusters: Tensor, num_clusters: int) -> RowPlan:
        active = indices >= 0
        adapter = torch.where(active, indices, torch.zeros_like(indices))
        cluster = clusters[adapter]
        onehot = torch.nn.functional.one_hot(cluster, num_clusters).float() * active[:, None].float()
        return cls(onehot, adapter)


def stacked_delta(x: Tensor, U_cat: Tensor, V_cat: Tensor, sigma: Tensor, plan: RowPlan,
                  method: str | None = None) -> Tensor:
    """Per-row ΔW x for one module from the stacked bases (see the module docstring).

    x [N, T, d_in] (or [N, d_in]); V_cat [d_in, K·r]; U_cat [K·r, d_out]; sigma [n, r, r] | [n, r] |
    [n, r, 2R] (method="lowrank"); plan for N rows (or 1 row, broadcast to all). Equals `bank_delta`
    up to float rounding.
    """
    squeeze = x.dim() == 2
    x3 = x[:, None] if squeeze else x
    n, t = x3.shape[0], x3.shape[1]
    k = plan.onehot.shape[1]
    r = V_cat.shape[1] // k
    mask = plan.onehot.to(x3.dtype)[:, None, :, None]  # [N|1, 1, K, 1]
    h = (x3 @ V_cat).view(n, t, k, r)
    h = (h * mask).sum(2)  # the row's own cluster block [N, T, r]
    s = sigma[plan.adapter]
    if method == "lowrank":  # h Σᵀ = (h Q) Pᵀ through the rank-R core
        R = s.shape[-1] // 2
        h = (h @ s[..., R:]) @ s[..., :R].mT
    elif sigma.dim() == 3:
        h = h @ s.mT
    else:
        h = h * s[:, None, :]
    y = (h[:, :, None, :] * mask).reshape(n, t, k * r) @ U_cat
    return y[:, 0] if squeeze else y


@dataclass
class AdapterSelection:
    """The per-row adapter ids every BankLinear of one model reads (None = bank off)."""

    indices: Tensor | None = None
    broadcast: bool = False  # indices has one entry, applied to every row of every forward
    plan: RowPlan | None = None  # routing for stacked_delta, built with the indices


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
        K, _, r = module.U.shape
        self.stacked = K <= STACK_MAX_CLUSTERS
        if self.stacked:  # [V_1 ... V_K] and [U_1 ... U_K]^T, for one GEMM each over all clusters
            self.register_buffer("V_cat", self.V.permute(1, 0, 2).reshape(self.V.shape[1], K * r), persistent=False)
            self.register_buffer("U_cat", self.U.permute(0, 2, 1).reshape(K * r, self.U.shape[1]), persistent=False)
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
        if self.stacked and self.selection.plan is not None:
            delta = stacked_delta(x.to(self.U_cat.dtype), self.U_cat, self.V_cat, self.sigma, self.selection.plan,
                                  self.method)
            return result + delta.to(result.dtype)
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
    cluster_ids: Tensor | None = field(default=None, repr=False)

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
        sel = self.selection
        previous = sel.indices, sel.broadcast, sel.plan
        sel.indices, sel.broadcast = indices, broadcast
        sel.plan = RowPlan.build(indices, self._clusters, self.bank.num_clusters)
        try:
            yield
        finally:
            sel.indices, sel.broadcast, sel.plan = previous

    @property
    def _clusters(self) -> Tensor:
        if self.cluster_ids is None:
            self.cluster_ids = torch.tensor(self.bank.clusters, dtype=torch.long)
        return self.cluster_ids

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
