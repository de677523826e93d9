"""The torch engine's KV cache: one slot per running row, plus the attention that reads it.

Per layer, keys and values live in ``[slots, kv_heads, capacity, head_dim]`` buffers. A row keeps
its slot for its whole life; its token at sequence position p is stored at column p. The engine
keeps the *decoding* rows in slots ``0..D-1`` so a decode step attends over the plain view
``K[:D, :, :L]`` — no per-step gather or re-stacking of the batch's caches (the cost of
re-stacking HF ``DynamicCache`` objects grows with batch × context every step). When a row
finishes, the last decoding row moves into its slot (one copy of one row, once); a row that
finishes its prefill moves to slot D. Columns past a row's length hold stale values that the
attention mask hides.

:class:`SlotCache` is duck-typed as a transformers ``Cache`` (``update(k, v, layer_idx)``), so the
model's own forward drives it. The attention registered as ``"atelier_slots"`` handles grouped-
query attention by folding the query groups into the query axis (no ``repeat_kv`` copy of K/V);
with no explicit mask it defers to transformers' SDPA attention, so other forwards on the same
model (``predict_many``, ``generate``) behave exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

ATTENTION = "atelier_slots"


class SlotCache:
    """K/V buffers for ``slots`` rows of one model; bind a forward with :meth:`bind` first."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = 256):
        self.num_layers, self.slots, self.kv_heads, self.head_dim = num_layers, slots, kv_heads, head_dim
        self.dtype, self.capacity = dtype, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ensure_capacity(capacity)
        self._rows: list[int] = []
        self._contiguous: tuple[int, int] | None = None
        self._starts: list[int] = []
        self._kv_len = 0
        self._decode_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, model, slots: int, capacity: int = 256) -> SlotCache:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        return cls(cfg.num_hidden_layers, slots, kv_heads, head_dim, dtype, capacity)

    def ensure_capacity(self, length: int) -> None:
        """Grow every buffer (doubling) so positions ``< length`` fit; existing contents are kept."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity, 64)
        shape = (self.slots, self.kv_heads, new, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype)
                if store and self.capacity:
                    grown[:, :, : self.capacity] = store[i]
                if len(store) > i:
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (every layer)."""
        if src == dst or length <= 0:
            return
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of slots ``a`` and ``b`` (every layer)."""
        if a == b or length <= 0:
            return
        for store in (self.keys, self.values):
            for t in store:
                tmp = t[a, :, :length].clone()
                t[a, :, :length] = t[b, :, :length]
                t[b, :, :length] = tmp

    # ------------------------------------------------------------------ one forward
    def bind(self, rows: Sequence[int], starts: Sequence[int], width: int) -> SlotCache:
        """The next forward writes batch row i's ``width`` columns at positions ``starts[i]..`` of slot
        ``rows[i]`` and attends over positions ``< max(starts) + width``."""
        self._rows, self._starts = list(rows), list(starts)
        self._kv_len = max(s + width for s in starts)
        self.ensure_capacity(self._kv_len)
        lo = self._rows[0]
        self._contiguous = (lo, lo + len(rows)) if self._rows == list(range(lo, lo + len(rows))) else None
        self._decode_index = None
        if width == 1:
            self._decode_index = (torch.tensor(self._rows), torch.tensor(self._starts))
        return self

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's K/V (B, H, T, D) into the bound slots; return the K/V to attend over."""
        out = []
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            buf = store[layer_idx]
            new = new.to(buf.dtype)
            if self._decode_index is not None:
                rows, pos = self._decode_index
                buf[rows, :, pos] = new[:, :, 0]
            else:
                width = new.shape[2]
                for i, (slot, start) in enumerate(zip(self._rows, self._starts, strict=True)):
                    buf[slot, :, start:start + width] = new[i]
            if self._contiguous is not None:
                lo, hi = self._contiguous
                out.append(buf[lo:hi, :, : self._kv_len])
            else:
                out.append(torch.stack([buf[s, :, : self._kv_len] for s in self._rows]))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


def attention_mask(starts: Sequence[int], lengths: Sequence[int], width: int) -> torch.Tensor:
    """Boolean mask [B, 1, width, max(start)+width]: column t of row i (position starts[i]+t) sees
    positions <= its own; padding columns (t >= lengths[i]) see position 0 only (their output is unused)."""
    starts_t = torch.tensor(list(starts))[:, None, None]
    lengths_t = torch.tensor(list(lengths))[:, None, None]
    kv_len = int(starts_t.max()) + width
    q = torch.arange(width)[None, :, None]
    k = torch.arange(kv_len)[None, None, :]
    visible = k <= starts_t + q
    padding = q >= lengths_t
    visible = torch.where(padding, k == 0, visible)
    return visible[:, None]


def grouped_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
    """Attention for the engine's forwards: grouped-query attention without repeating K/V.

    query (B, H, T, D), key/value (B, Hkv, L, D), mask (B, 1, T, L) bool or additive. The G = H/Hkv
    query heads sharing one K/V head are folded into the query axis: (B, Hkv, G·T, D). Without a
    mask this is transformers' own SDPA attention. Returns (B, T, H, D) like every HF attention.
    """
    if attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, t, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    q = query.reshape(b, hkv, g * t, d)
    mask = attention_mask[:, :, :, : key.shape[-2]]
    if g > 1:
        mask = mask.unsqueeze(2).expand(mask.shape[0], 1, g, t, mask.shape[-1]).reshape(mask.shape[0], 1, g * t, -1)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, t, d).transpose(1, 2).contiguous(), None


def install_attention(model) -> None:
    """Register ``"atelier_slots"`` (attention + transformers' SDPA mask) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
