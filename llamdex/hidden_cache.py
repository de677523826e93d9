"""Run the frozen LLM over the training prompts ONCE and keep what the two stages need.

* Stage 1 (encoder) needs the residual stream entering layer k at every prompt position:
  ``hidden[k][i]`` is (T_i, d) for prompt i (no padding stored).
* Stage 2 (decoder) runs only the slot positions through layers k..L-1 (see
  :func:`llamdex.llm_ops.run_slots`), so it needs the prompt's keys/values at layers >= k:
  ``keys[i]`` / ``values[i]`` are (L - kv_from, kv_heads, T_i, head_dim) for the prompts asked for.

* What follows the answer (fluent chat, stage 2's end-of-turn objective): for the same prompts,
  ``answers[i]`` is (C, d): the input of layer k at the position right after the n slots when the
  answer token of class c is written there. It does not depend on the connectors: below layer k the
  slots hold the fixed ``placeholder``, so it is computed once here (prompt -> slots -> answer token,
  each class in turn, up to layer k).

Several layers can be captured in one pass (for a k sweep). Prompts are batched by length
(little padding); batches that need no keys/values stop after the deepest captured layer.
Storage is bfloat16 by default (half the memory; the rounding is far below the encoder's error).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from causal_lm import backbone, left_pad, num_layers
from llamdex.llm_ops import PrefixKV

CacheProgress = Callable[[int, int, float], None]  # (prompts done, total, seconds so far)


class _Stop(Exception):
    """Raised by the capture hook to skip the layers nobody needs."""


@dataclass
class PromptCache:
    """Per-prompt hidden states at some layers and (optionally) keys/values from ``kv_from`` up."""

    lengths: list[int]
    hidden: dict[int, list[torch.Tensor]]
    tokens: list[list[int]] = field(default_factory=list)  # prompt token ids (for encoders reading tokens)
    kv_from: int | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt index -> (L-kv_from, kvh, T, hd)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    answers: dict[int, torch.Tensor] = field(default_factory=dict)  # prompt index -> (C, d) at layer kv_from
    seconds: float = 0.0

    def hidden_batch(self, layer: int, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h (B, T, d) float32 right-padded, mask (B, T) bool) for prompts ``idx`` at ``layer``."""
        seqs = [self.hidden[layer][i] for i in idx]
        h = pad_sequence(seqs, batch_first=True).float()
        lengths = torch.tensor([len(s) for s in seqs])
        return h, torch.arange(h.shape[1])[None, :] < lengths[:, None]

    def tokens_batch(self, idx: Sequence[int]) -> torch.Tensor:
        """Token ids (B, T) of prompts ``idx``, right-padded with 0 like :meth:`hidden_batch`."""
        return pad_sequence([torch.tensor(self.tokens[i], dtype=torch.long) for i in idx], batch_first=True)

    def prefix_batch(self, layer: int, idx: Sequence[int], dtype: torch.dtype = torch.float32
                     ) -> tuple[PrefixKV, torch.Tensor, torch.Tensor]:
        """(PrefixKV for layers >= ``layer``, prefix mask (B, P) left-padded, lengths (B,)) for ``idx``."""
        if self.kv_from is None or layer < self.kv_from:
            raise ValueError(f"layer: keys/values were cached from layer {self.kv_from}, not {layer}; "
                             "fix: build the cache with kv_from <= layer")
        missing = [i for i in idx if i not in self.keys]
        if missing:
            raise ValueError(f"idx: prompts {missing[:5]} have no cached keys/values; fix: list them in kv_rows")
        lengths = torch.tensor([self.lengths[i] for i in idx])
        width = int(lengths.max())
        off = layer - self.kv_from

        def stack(store: dict[int, torch.Tensor]) -> torch.Tensor:
            first = store[idx[0]]
            out = torch.zeros(len(idx), first.shape[0] - off, first.shape[1], width, first.shape[3], dtype=dtype)
            for row, i in enumerate(idx):
                out[row, :, :, width - self.lengths[i]:] = store[i][off:]
            return out

        k, v = stack(self.keys), stack(self.values)
        mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]
        n_layers = k.shape[1]
        prefix = PrefixKV({layer + j: k[:, j] for j in range(n_layers)}, {layer + j: v[:, j] for j in range(n_layers)})
        return prefix, mask, lengths

    def cached(self, rows: Sequence[int]) -> list[int]:
        """The prompts among ``rows`` whose hidden states were captured (a deadline may skip some)."""
        first = next(iter(self.hidden.values()))
        return [i for i in rows if first[i] is not None]

    def nbytes(self) -> int:
        """Memory held by the cache."""
        tensors = [t for seqs in self.hidden.values() for t in seqs if t is not None]
        tensors += list(self.keys.values()) + list(self.values.values()) + list(self.answers.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def build_cache(model, prompts: list[list[int]], layers: Sequence[int], pad_id: int, kv_from: int | None = None,
                kv_rows: Sequence[int] = (), batch_size: int = 16, dtype: torch.dtype = torch.bfloat16,
                progress: CacheProgress | None = None, deadline: float | None = None,
                answers: AnswerInputs | None = None) -> PromptCache:
    """Capture the inputs of decoder ``layers`` for every prompt, and keys/values of layers >= ``kv_from``
    for the prompts in ``kv_rows`` (with ``answers``: also each class's answer-token state after the
    slots, see the module docstring). The model is only read (no gradients, no state change).

    ``kv_rows`` are cached first; once ``deadline`` (a ``time.perf_counter()`` value) passes, the
    remaining prompts are skipped (see :meth:`PromptCache.cached`)."""
    n_layers = num_layers(model)
    layers = sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers: {layers} must be within 0..{n_layers - 1}; fix: pick k below the layer count")
    kv_set = set(kv_rows) if kv_from is not None else set()
    cache = PromptCache(lengths=[len(p) for p in prompts], hidden={k: [None] * len(prompts) for k in layers},
                        tokens=[list(p) for p in prompts], kv_from=kv_from)
    start, done = time.perf_counter(), 0
    shared = _shared_prefix(model, prompts, layers)
    kv_group = sorted(kv_set)
    for group in (kv_group, [i for i in range(len(prompts)) if i not in kv_set]):
        # sort by length (little padding) within chunks taken in the given order, so that a deadline
        # drops a random subset (the caller's order), not systematically the longest prompts
        chunks = [group[c:c + 8 * batch_size] for c in range(0, len(group), 8 * batch_size)]
        order = [i for chunk in chunks for i in sorted(chunk, key=lambda i: cache.lengths[i])]
        for b in range(0, len(order), batch_size):
            if group is not kv_group and deadline is not None and time.perf_counter() > deadline:
                break
            idx = order[b:b + batch_size]
            _run_batch(model, prompts, idx, layers, pad_id, cache, dtype, shared,
                       with_kv=bool(kv_set) and idx[0] in kv_set, answers=answers)
            done += len(idx)
            if progress is not None:
                progress(done, len(prompts), time.perf_counter() - start)
    cache.seconds = time.perf_counter() - start
    return cache


@dataclass(frozen=True)
class AnswerInputs:
    """What :func:`build_cache` needs to compute answer-token states: the slots' fixed input below
    layer k (n, d) and the class answer token ids."""

    placeholder: torch.Tensor
    token_ids: list[int]


@dataclass
class _Shared:
    """The token prefix every prompt starts with (system prompt + chat header), run once."""

    length: int
    hidden: dict[int, torch.Tensor]  # layer -> (P, d)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kvh, P, hd) keys, values


def _forward(model, ids: torch.Tensor | None, mask: torch.Tensor, pos: torch.Tensor, layers: list[int], past,
             stop_early: bool, embeds: torch.Tensor | None = None):
    """Decoder stack only (no LM head); captures the inputs of ``layers``; optionally stops after the last.
    ``embeds`` replaces ``ids`` (input embeddings, e.g. the slots' placeholder)."""
    captured: dict[int, torch.Tensor] = {}

    def make_hook(k: int):
        def hook(module, args, kwargs):
            captured[k] = (args[0] if args else kwargs["hidden_states"]).detach()
            if stop_early and k == layers[-1]:
                raise _Stop
        return hook

    blocks = backbone(model).layers
    handles = [blocks[k].register_forward_pre_hook(make_hook(k), with_kwargs=True) for k in layers]
    try:
        out = backbone(model)(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                              past_key_values=past, use_cache=past is not None or not stop_early)
    except _Stop:
        out = None
    finally:
        for h in handles:
            h.remove()
    return captured, out


def _shared_prefix(model, prompts: list[list[int]], layers: list[int]) -> _Shared:
    """Longest common token prefix (leaving >= 1 own token per prompt), computed once: saves its
    share of every prompt's forward (~20% for the chat-templated questions)."""
    n = 0
    limit = min(len(p) for p in prompts) - 1
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    if n < 4:
        return _Shared(0, {}, [])
    ids = torch.tensor([prompts[0][:n]])
    captured, out = _forward(model, ids, torch.ones_like(ids), torch.arange(n)[None], layers, None, False)
    return _Shared(n, {k: captured[k][0] for k in layers},
                   [(lay.keys, lay.values) for lay in out.past_key_values.layers])


def _run_batch(model, prompts: list[list[int]], idx: list[int], layers: list[int], pad_id: int,
               cache: PromptCache, dtype: torch.dtype, shared: _Shared, with_kv: bool,
               answers: AnswerInputs | None = None) -> None:
    p = shared.length
    ids, mask, pos = left_pad([prompts[i][p:] for i in idx], pad_id)
    past = None
    if p:  # continue from the shared prefix: [prefix ; left pads ; own tokens], pads masked out
        b = len(idx)
        past = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in shared.kv])
        mask, pos = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1), pos + p
    captured, out = _forward(model, ids, mask, pos, layers, past, stop_early=not with_kv)
    width = ids.shape[1]
    for row, i in enumerate(idx):
        start = width - (cache.lengths[i] - p)
        for k in layers:
            own = captured[k][row, start:]
            cache.hidden[k][i] = (torch.cat([shared.hidden[k], own]) if p else own).to(dtype, copy=True)
        if with_kv and cache.kv_from is not None:
            kv_layers = out.past_key_values.layers[cache.kv_from:]
            cache.keys[i] = torch.stack([_strip(lay.keys, row, p, start) for lay in kv_layers]).to(dtype, copy=True)
            cache.values[i] = torch.stack([_strip(lay.values, row, p, start) for lay in kv_layers]).to(dtype, copy=True)
    if with_kv and answers is not None and cache.kv_from is not None:
        states = _answer_states(model, out.past_key_values, mask, pos[:, -1], answers, cache.kv_from)
        for row, i in enumerate(idx):
            cache.answers[i] = states[row].to(dtype, copy=True)


def _answer_states(model, past, mask: torch.Tensor, last_pos: torch.Tensor, answers: AnswerInputs,
                   layer: int) -> torch.Tensor:
    """(B, C, d): the input of ``layer`` at the position after the slots, for each class's answer token
    (prompt keys/values below ``layer`` from ``past``; the slots' placeholder; one class at a time)."""
    embed = backbone(model).embed_tokens
    b, n = mask.shape[0], answers.placeholder.shape[0]
    if layer == 0:
        return embed(torch.tensor(answers.token_ids)).detach()[None].expand(b, -1, -1)
    below = [(lay.keys, lay.values) for lay in past.layers[:layer]]
    slot_mask = torch.cat([mask, torch.ones(b, n, dtype=mask.dtype)], dim=1)
    slot_pos = last_pos[:, None] + 1 + torch.arange(n)[None, :]
    slots = answers.placeholder.to(embed.weight.dtype)[None].expand(b, -1, -1)
    with_slots = DynamicCache(below)
    _forward(model, None, slot_mask, slot_pos, [layer], with_slots, stop_early=True, embeds=slots)
    after = [(lay.keys, lay.values) for lay in with_slots.layers[:layer]]
    out = []
    for token in answers.token_ids:
        ids = torch.full((b, 1), token, dtype=torch.long)
        captured, _ = _forward(model, ids, torch.cat([slot_mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1),
                               slot_pos[:, -1:] + 1, [layer], DynamicCache(after), stop_early=True)
        out.append(captured[layer][:, -1])
    return torch.stack(out, dim=1)


def _strip(t: torch.Tensor, row: int, p: int, start: int) -> torch.Tensor:
    """Row ``row`` of cached keys/values (B, kvh, p + width, hd) without its left pads: (kvh, T, hd)."""
    return torch.cat([t[row, :, :p], t[row, :, p + start:]], dim=1)
