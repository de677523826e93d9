"""Exact, cached forward passes for LoRA training and evaluation on the codebook tasks (:mod:`.tasks`).

LoRA is applied to the top layers only (``layers_to_transform``). The layers below the first
adapted layer are frozen, so their hidden states for each training/eval sequence are computed once
per (base model, split layer, prompt + answer token) and cached in memory; each optimisation step
then runs only the adapted top layers on the cached states, and only the last two positions go
through the LM head. The split forward is exact (tested against the full forward) and is used for
Llama-style decoders (``model.model`` with ``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``);
other architectures fall back to the full forward. The cache assumes frozen base weights: call
:func:`clear_cache` after changing them.
Batches are drawn within one phrasing, and the batch's common token prefix (system turn + question
start) goes through the adapted layers once, its keys/values shared by every row (also exact).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from typing import Protocol

import torch

from causal_lm import backbone, base_lm, chat_ids, left_pad, num_layers, position_ids
from compression.batched import BankLinear


class AnsweredQuestion(Protocol):
    """One question with its one-token answer (``compression.codebook.tasks.Example`` is one)."""

    messages: list[dict[str, str]]
    answer: str


def split_backbone(model):
    """(underlying LM, its decoder stack) -- the stack is None when the split forward cannot run
    (not a Llama-style decoder with an ``lm_head``): callers then take the full forward."""
    lm = base_lm(model)
    try:
        bb = backbone(lm)
    except TypeError:
        bb = None
    return lm, (bb if hasattr(lm, "lm_head") else None)


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def first_adapted_layer(model) -> int:
    """Lowest decoder layer holding LoRA weights or a compressed-bank layer (``compression.BankLinear``);
    ``num_layers`` when there are none. The split forward caches the states entering this layer."""
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    names += [n + "." for n, mod in model.named_modules() if isinstance(mod, BankLinear)]
    idx = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    return min(idx) if idx else num_layers(model)


def _run_layers(bb, x: torch.Tensor, mask: torch.Tensor, layers: Sequence) -> torch.Tensor:
    """Run decoder ``layers`` on left-padded hidden states ``x`` [B, T, d] with 2-D ``mask``."""
    from transformers.masking_utils import create_causal_mask

    pos = position_ids(mask)
    causal = create_causal_mask(config=bb.config, inputs_embeds=x, attention_mask=mask, past_key_values=None,
                                position_ids=pos)
    pe = bb.rotary_emb(x, pos)
    for layer in layers:
        x = layer(x, attention_mask=causal, position_embeddings=pe, position_ids=pos)
    return x


def _common_prefix(ids: Sequence[torch.Tensor]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least two own tokens."""
    n = min(int(i.shape[0]) for i in ids) - 2
    if len(ids) < 2 or n <= 0:
        return 0
    stack = torch.stack([i[:n] for i in ids])
    same = (stack == stack[0]).all(0)
    return n if bool(same.all()) else int(same.long().argmin())


def _run_layers_shared_prefix(bb, prefix: torch.Tensor, suffix: torch.Tensor, smask: torch.Tensor,
                              layers: Sequence, first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` on sequences that share ``prefix`` [1, P, d] and continue with left-padded
    ``suffix`` [B, S, d]: the prefix goes through once (batch 1) and its keys/values are reused by
    every row, which is exact (causal attention) and differentiable. Returns (prefix out, suffix out)."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    B, P = suffix.shape[0], prefix.shape[1]
    cache = DynamicCache(config=bb.config)
    pmask = torch.ones(1, P, dtype=torch.long)
    ppos = position_ids(pmask)
    pcausal = create_causal_mask(config=bb.config, inputs_embeds=prefix, attention_mask=pmask,
                                 past_key_values=cache, position_ids=ppos, layer_idx=first_layer)
    pe = bb.rotary_emb(prefix, ppos)
    h = prefix
    for layer in layers:
        h = layer(h, attention_mask=pcausal, position_embeddings=pe, position_ids=ppos, past_key_values=cache,
                  use_cache=True)
    for cl in cache.layers:
        if getattr(cl, "is_initialized", False):
            cl.keys = cl.keys.expand(B, -1, -1, -1)
            cl.values = cl.values.expand(B, -1, -1, -1)
    full = torch.cat([torch.ones(B, P, dtype=torch.long), smask], 1)
    spos = P + position_ids(smask)
    scausal = create_causal_mask(config=bb.config, inputs_embeds=suffix, attention_mask=full,
                                 past_key_values=cache, position_ids=spos, layer_idx=first_layer)
    pe = bb.rotary_emb(suffix, spos)
    x = suffix
    for layer in layers:
        x = layer(x, attention_mask=scausal, position_embeddings=pe, position_ids=spos, past_key_values=cache,
                  use_cache=True)
    return h, x


def _run_states(bb, states: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], start: int, end: int,
                shared_prefix: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run decoder layers [start, end) of ``bb`` on per-sequence input states [T_i, d].

    Returns (per-sequence outputs [T_i, d], outputs of the last two positions [B, 2, d]). Sequences sharing a
    common token prefix (the chat template's system turn, at least) take the shared-prefix path."""
    layers = bb.layers[start:end]
    P = _common_prefix(ids) if shared_prefix else 0
    if P >= 4:
        suffix, smask, _ = left_pad([s[P:] for s in states], 0.0)
        h, x = _run_layers_shared_prefix(bb, states[0][None, :P], suffix, smask, layers, start)
        S = suffix.shape[1]
        full = [torch.cat([h[0], x[j, S - (s.shape[0] - P):]]) for j, s in enumerate(states)]
        return full, x[:, -2:]
    x, mask, _ = left_pad(list(states), 0.0)
    x = _run_layers(bb, x, mask, layers)
    T = x.shape[1]
    return [x[j, T - s.shape[0]:] for j, s in enumerate(states)], x[:, -2:]


def answer_token_id(tokenizer, answer: str) -> int:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return ids[0]


class _PromptCache:
    """Per base model: encoded prompts and hidden states entering layer L (frozen part)."""

    def __init__(self) -> None:
        self.ids: dict[str, torch.Tensor] = {}
        self.states: dict[tuple[int, str], torch.Tensor] = {}


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget cached prompt states (needed only if base weights were changed in place)."""
    _CACHES.clear()


def _cache_for(model) -> _PromptCache:
    lm = base_lm(model)
    cache = _CACHES.get(lm)
    if cache is None:
        cache = _CACHES[lm] = _PromptCache()
    return cache


def prompt_ids(model, tokenizer, examples: Sequence[AnsweredQuestion]) -> list[torch.Tensor]:
    cache = _cache_for(model)
    out = []
    for ex in examples:
        text = ex.messages[-1]["content"] if len(ex.messages) == 1 else json.dumps(ex.messages)
        ids = cache.ids.get(text)
        if ids is None:
            ids = cache.ids[text] = torch.tensor(chat_ids(tokenizer, ex.messages), dtype=torch.long)
        out.append(ids)
    return out


def seq_ids(model, tokenizer, examples: Sequence[AnsweredQuestion]) -> list[torch.Tensor]:
    """Prompt + answer token: position -2 predicts the answer, position -1 the end of turn."""
    return [torch.cat([i, torch.tensor([answer_token_id(tokenizer, ex.answer)])])
            for i, ex in zip(prompt_ids(model, tokenizer, examples), examples, strict=True)]


@torch.no_grad()
def lower_states(model, tokenizer, examples: Sequence[AnsweredQuestion], split: int, batch_size: int,
                  shared_prefix: bool = True) -> list[torch.Tensor]:
    """Hidden states [T_i, d] entering layer ``split`` for each example's prompt + answer (cached)."""
    _, bb = split_backbone(model)
    cache = _cache_for(model)
    ids = seq_ids(model, tokenizer, examples)
    keys = [(split, tuple(i.tolist())) for i in ids]
    # sorted by token ids: a chunk shares its template's prefix, not only the system turn
    todo = sorted({k: i for k, i in zip(keys, ids, strict=True) if k not in cache.states}.items())
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        chunk_ids = [i for _, i in chunk]
        embeds = [bb.embed_tokens(i) for i in chunk_ids]
        outs = _run_states(bb, embeds, chunk_ids, 0, split, shared_prefix)[0] if split > 0 else embeds
        for (k, _), o in zip(chunk, outs, strict=True):
            cache.states[k] = o.detach().clone()
    return [cache.states[k] for k in keys]


def last_logits(model, tokenizer, examples: Sequence[AnsweredQuestion], split: int | None, bf16: bool,
                 states: Sequence[torch.Tensor] | None = None, shared_prefix: bool = True) -> torch.Tensor:
    """Logits [B, 2, V] of prompt + answer: [:, 0] at the last prompt position (predicts the
    answer token), [:, 1] at the answer token (predicts the end of turn; teacher forcing)."""
    lm, bb = split_backbone(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if bb is None or split is None:
            ids, mask, pos = left_pad(seq_ids(model, tokenizer, examples), 0)
            h = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=2).logits
            return h[:, -2:].float()
        ids = seq_ids(model, tokenizer, examples)
        _, last = _run_states(bb, states, ids, split, len(bb.layers), shared_prefix)
        return lm.lm_head(bb.norm(last)).float()



def predict_logits(model, tokenizer, examples: Sequence[AnsweredQuestion], bf16: bool = False, batch_size: int = 32,
                   split_forward: bool = True, shared_prefix: bool = True,
                   split_at: int | None = None) -> torch.Tensor:
    """Logits [len(examples), 2, vocab] at the answer and end-of-turn positions (split forward when possible)."""
    _, bb = split_backbone(model)
    split = None
    if split_forward and bb is not None:
        split = first_adapted_layer(model) if split_at is None else min(split_at, first_adapted_layer(model))
    out = []
    with torch.no_grad():
        for b in range(0, len(examples), batch_size):
            chunk = examples[b:b + batch_size]
            states = lower_states(model, tokenizer, chunk, split, batch_size, shared_prefix) \
                if split is not None else None
            out.append(last_logits(model, tokenizer, chunk, split, bf16, states, shared_prefix))
    return torch.cat(out)
