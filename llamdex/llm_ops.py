"""Exact helpers over a frozen Hugging Face Llama-style causal LM for Llamdex's insertion.

(What every user of the LLM needs -- its backbone, layer count, left padding, chat encoding --
is in :mod:`causal_lm`.) Connector training (stage 2) and insertion both need two operations on the frozen LLM:

* :func:`overwrite_at_layer` -- replace the residual stream of some positions at the *input* of
  decoder layer k (before its ``input_layernorm``), via a forward pre-hook, inside an ordinary
  ``model(...)`` call (so HF masks, caches and generation keep working).
* :func:`run_slots` -- run only the n slot positions through layers k..L-1, attending to the
  prompt's cached keys/values at those layers. This equals the full forward exactly: prompt
  positions never attend to the later slots (causal mask), and the slots' inputs at layer k are
  overwritten, so nothing the slots held before layer k reaches any later layer. It costs n
  positions x (L-k) layers instead of (T+n) x L per training step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

from causal_lm import backbone


class PrefixKV:
    """Read-only stand-in for a HF ``Cache``: attention at layer i sees [prefix_i ; new] keys/values.

    ``keys[i]`` / ``values[i]``: (B, kv_heads, P, head_dim), already rotated (HF caches post-RoPE
    keys). Nothing is stored on update, so one PrefixKV serves any number of training steps.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx], key_states], dim=-2),
                torch.cat([self.values[layer_idx], value_states], dim=-2))


def slot_attention_mask(prefix_mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, n, P+n): slots see the real prefix tokens and earlier slots (causal)."""
    b, p = prefix_mask.shape
    allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(b, n, p),
                         torch.ones(n, n, dtype=torch.bool).tril()[None].expand(b, n, n)], dim=2)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def run_slots(model, slots: torch.Tensor, layer: int, prefix: PrefixKV, prefix_mask: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """Slots (B, n, d) entering layer ``layer`` -> final-normed hidden states (B, n, d) after the last layer.

    ``prefix`` holds the prompt's keys/values for layers >= ``layer`` (left-padded to P, with
    ``prefix_mask`` (B, P) marking real tokens); ``positions`` (B, n) are the slots' position ids.
    """
    inner = backbone(model)
    mask = slot_attention_mask(prefix_mask, slots.shape[1], slots.dtype)
    emb = inner.rotary_emb(slots, positions)
    h = slots
    for block in inner.layers[layer:]:
        h = block(h, attention_mask=mask, position_embeddings=emb, position_ids=positions,
                  past_key_values=prefix, use_cache=False)
    return inner.norm(h)


def class_logits(model, hidden: torch.Tensor, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """LM-head logits of final-normed ``hidden`` (..., d) restricted to ``token_ids`` (..., C)."""
    head = model.get_output_embeddings()
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
    return F.linear(hidden, head.weight[ids], bias)


@contextmanager
def overwrite_at_layer(model, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, every forward replaces the input of decoder layer ``layer`` by ``fn(hidden)``."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    handle = backbone(model).layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
