"""The two connector training stages (paper §2.3) and their evaluations, on a :class:`PromptCache`.

* Stage 1 fits the encoder to the codec-encoded true features of each prompt's synthetic row
  (per-type losses, see :meth:`Encoder.loss`), reading only cached layer-k hidden states.
* Stage 2 fits the decoder at the last slot's class tokens. The ground-truth features go straight
  into the frozen synthetic-data expert (teacher forcing), so the decoder learns to *read the
  expert* rather than memorise random synthetic labels. By default the target is the expert's own
  class distribution, on its outputs and on random ones (see :func:`train_decoder`; the paper's
  label cross-entropy is ``objective="labels"``). Only the n slot positions run through layers
  k..L-1 against the prompt's cached keys/values (exact, see :mod:`llamdex.llm_ops`).

Both stages share :func:`fit`: AdamW, linear warm-up then cosine decay, shuffled mini-batches,
a progress callback per epoch, and an optional deadline; after the first epoch the schedule is
re-planned to the number of epochs that fit before the deadline, so the cosine still completes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from llamdex.codec import FeatureCodec
from llamdex.connectors import Decoder, sharpen
from llamdex.encoder import Encoder, EncoderRaw
from llamdex.hidden_cache import PromptCache
from llamdex.literals import LiteralBatch, PromptLiterals, layout, target_mask
from llamdex.llm_ops import class_logits, run_slots


@dataclass(frozen=True)
class StageReport:
    """Passed to ``progress`` after each epoch (or cache batch): what ran, how far, how long."""

    stage: str  # "cache" | "expert" | "encoder" | "decoder"
    epoch: int
    epochs: int
    loss: float
    seconds: float
    extra: dict = field(default_factory=dict)


Progress = Callable[[StageReport], None]


@dataclass(frozen=True)
class FitSettings:
    """Optimiser knobs of one stage."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    seed: int = 0


def fit(params: list[nn.Parameter], n: int, settings: FitSettings, step: Callable[[list[int]], torch.Tensor],
        stage: str, progress: Progress | None = None, deadline: float | None = None) -> list[float]:
    """Minimise ``step(batch positions) -> loss`` over shuffled batches of range(n); returns epoch losses."""
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(n / settings.batch_size)
    plan = {"total": settings.epochs * per_epoch}
    warm = max(1, int(settings.warmup_frac * plan["total"]))

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / plan["total"])))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(settings.seed)
    start, losses, epochs = time.perf_counter(), [], settings.epochs
    for epoch in range(1, settings.epochs + 1):
        total = count = 0.0
        for pos in torch.randperm(n, generator=gen).split(settings.batch_size):
            loss = step(pos.tolist())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()) * len(pos), count + len(pos)
            if deadline is not None and time.perf_counter() > deadline:
                epochs = epoch  # hard stop: the budget is spent
                break
        losses.append(total / count)
        seconds = time.perf_counter() - start
        if epoch == 1 and epochs > 1 and deadline is not None:  # re-plan: how many epochs fit before the deadline?
            epochs = max(1, min(settings.epochs, int((deadline - time.perf_counter()) / seconds) + 1))
            plan["total"] = epochs * per_epoch
        if progress is not None:
            progress(StageReport(stage, epoch, epochs, losses[-1], seconds))
        if epoch >= epochs:
            break
    return losses


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block (restored after); eval mode."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).eval()
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


@dataclass(frozen=True)
class PromptExtras:
    """What an encoder may read besides the cached hidden states, per cached prompt: the LLM's input
    embedding (for ``token_inputs``), the prompts' literals and, for training, the literal tokens
    where each copied feature's value is written (for ``copy_literals``)."""

    embed: nn.Module | None = None
    literals: list[PromptLiterals] | None = None
    value_tokens: list[dict[str, list[int]]] | None = None
    label_tokens: list[dict[str, list[int]]] | None = None


def encoder_run(encoder: Encoder, cache: PromptCache, layer: int, idx: Sequence[int], extras: PromptExtras
                ) -> EncoderRaw:
    """The encoder's raw outputs on cached prompts ``idx`` (hidden states + whatever else it reads)."""
    h, mask = cache.hidden_batch(layer, idx)
    embeds: torch.Tensor | None = None
    literals: LiteralBatch | None = None
    if encoder.cfg.token_inputs:
        if extras.embed is None:
            raise ValueError("embed: this encoder reads token embeddings; fix: pass model.get_input_embeddings()")
        with torch.no_grad():
            embeds = extras.embed(cache.tokens_batch(idx)).float()
    if encoder.copies:
        if extras.literals is None:
            raise ValueError("literals: this encoder copies values; fix: pass the prompts' token_literals")
        literals = layout([extras.literals[i] for i in idx], encoder.cfg.vocabulary, h.shape[1])
    return encoder(h, mask, embeds, literals)


def train_encoder(encoder: Encoder, cache: PromptCache, layer: int, x: torch.Tensor, rows: Sequence[int],
                  settings: FitSettings, numeric_weight: float = 1.0, progress: Progress | None = None,
                  deadline: float | None = None, extras: PromptExtras | None = None) -> list[float]:
    """Stage 1 on prompts ``rows`` (x: (N, m) codec-encoded true features, indexed like the cache)."""
    extras = extras or PromptExtras()
    encoder.fit_input_stats([cache.hidden[layer][i] for i in rows[:512]])
    encoder.train()
    names = [f.name for f in encoder.cfg.features]
    every = frozenset(names)  # any feature a question leaves out is "not stated"
    if encoder.copies and extras.value_tokens is None:
        raise ValueError("extras.value_tokens: this encoder copies values; fix: pass where each value is written")

    def step(pos: list[int]) -> torch.Tensor:
        idx = [rows[p] for p in pos]
        raw = encoder_run(encoder, cache, layer, idx, extras)
        targets = anchors = None
        if encoder.copies:
            assert extras.value_tokens is not None and raw.pointer_logits is not None
            width = raw.pointer_logits.shape[-1] - 1
            targets = target_mask([extras.value_tokens[i] for i in idx], names, width, every)
            if raw.anchor_logits is not None and extras.label_tokens is not None:
                anchors = target_mask([extras.label_tokens[i] for i in idx], names, width)[..., :-1]
        return encoder.loss(raw, x[idx], numeric_weight, targets, anchors)[0]

    losses = fit(list(encoder.parameters()), len(rows), settings, step, "encoder", progress, deadline)
    encoder.eval()
    return losses


def slot_class_logits(model: nn.Module, cache: PromptCache, layer: int, slots: torch.Tensor, idx: Sequence[int],
                      token_ids: list[int], answer: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class-token logits (B, C) at the last slot when ``slots`` (B, n, d) enter layer ``layer``, and,
    given ``answer`` (B, d: an answer token's layer-k input, :attr:`PromptCache.answers`), the full
    next-token logits (B, V) after that answer token (what the model says once it has answered)."""
    dtype = next(model.parameters()).dtype
    prefix, mask, lengths = cache.prefix_batch(layer, idx, dtype)
    seq = slots.to(dtype) if answer is None else torch.cat([slots.to(dtype), answer.to(dtype)[:, None]], dim=1)
    positions = lengths[:, None] + torch.arange(seq.shape[1])[None, :]
    hidden = run_slots(model, seq, layer, prefix, mask, positions)
    n = slots.shape[1]
    after = None if answer is None else model.get_output_embeddings()(hidden[:, n]).float()
    return class_logits(model, hidden[:, n - 1], token_ids).float(), after


def random_expert_outputs(n: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` expert outputs spread over everything an expert can say: binary (width 1) P(yes) half
    uniform, half U-shaped (confident); multiclass (width K) softmax of Gaussian scores with a
    random scale per row (0.3: nearly flat ... 10: nearly one-hot)."""
    if width == 1:
        u = torch.rand(n, 1, generator=generator)
        confident = (torch.sin((u - 0.5) * math.pi) + 1) / 2  # arcsine law: mass near 0 and 1
        pick = torch.rand(n, 1, generator=generator) < 0.5
        return torch.where(pick, u, confident)
    scale = torch.tensor([0.3, 1.0, 3.0, 10.0])[torch.randint(0, 4, (n,), generator=generator)]
    return torch.softmax(torch.randn(n, width, generator=generator) * scale[:, None], dim=1)


def as_distribution(p: torch.Tensor) -> torch.Tensor:
    """Expert output (B, c) -> class distribution (B, K): binary [1 - p, p], multiclass normalised."""
    if p.shape[1] == 1:
        return torch.cat([1 - p, p], dim=1)
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


def train_decoder(decoder: Decoder, model: nn.Module, expert: nn.Module, cache: PromptCache, layer: int,
                  x: torch.Tensor, y: torch.Tensor, rows: Sequence[int], token_ids: list[int],
                  settings: FitSettings, progress: Progress | None = None, deadline: float | None = None,
                  objective: str = "expert", random_share: float = 0.5, end_of_turn: int | None = None,
                  end_weight: float = 0.0) -> list[float]:
    """Stage 2 on prompts ``rows``: true features -> frozen expert -> decoder -> class tokens.

    ``objective="labels"`` is the paper's: cross-entropy against the synthetic labels.
    ``objective="expert"`` (default) makes the LLM *transmit the expert*: soft cross-entropy against
    the expert's own class distribution, and in a ``random_share`` of each batch the expert's output
    is replaced by a random one (:func:`random_expert_outputs`). The synthetic expert is confident on
    its synthetic rows, so label training only ever shows the decoder outputs near 0 and 1 and leaves
    its threshold anywhere in between; a tenant's real (or DP) expert is far less confident. The
    target is the expert's distribution at the decoder's ``sharpen`` temperature (what it transmits).

    **What follows the answer** (``end_weight`` > 0): serving forces the class answer token after the
    slots and lets the model continue; untrained, what follows is noise ("Yes, no, no, the
    documentary"). So the decoder is also trained, with weight ``end_weight``, to make the model end
    its turn (token ``end_of_turn``) right after the answer token of a random class (every class's
    answer-token state is cached: :attr:`PromptCache.answers`).
    """
    if objective not in ("labels", "expert"):
        raise ValueError(f"objective: {objective!r}; fix: use 'labels' or 'expert'")
    ending = end_weight > 0 and end_of_turn is not None
    if ending and any(i not in cache.answers for i in rows):
        raise ValueError("cache: answer-token states are missing; fix: build the cache with answers=AnswerInputs(...)")
    decoder.train()
    with torch.no_grad():
        p_all = expert(x[list(rows)]).float()  # the expert is frozen and sees ground truth: compute once
    gen = torch.Generator().manual_seed(settings.seed + 1)

    def step(pos: list[int]) -> torch.Tensor:
        idx = [rows[p] for p in pos]
        p = p_all[pos]
        answer = None
        if ending:
            pick = torch.randint(0, len(token_ids), (len(idx),), generator=gen)
            answer = torch.stack([cache.answers[i][int(c)] for i, c in zip(idx, pick, strict=True)]).float()
        if objective == "labels":
            logits, after = slot_class_logits(model, cache, layer, decoder(p), idx, token_ids, answer)
            loss = F.cross_entropy(logits, y[idx])
        else:
            n_random = int(round(random_share * len(pos)))
            if n_random:
                p = torch.cat([random_expert_outputs(n_random, p.shape[1], gen), p[n_random:]])
            logits, after = slot_class_logits(model, cache, layer, decoder(p), idx, token_ids, answer)
            target = as_distribution(sharpen(p, decoder.cfg.sharpen))  # what the decoder transmits
            loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
        if after is not None:
            loss = loss + end_weight * F.cross_entropy(after, torch.full((len(idx),), int(end_of_turn)))
        return loss

    with frozen(model):
        losses = fit(list(decoder.parameters()), len(rows), settings, step, "decoder", progress, deadline)
    decoder.eval()
    return losses


@torch.no_grad()
def encoder_features(encoder: Encoder, cache: PromptCache, layer: int, rows: Sequence[int], batch: int = 64,
                     extras: PromptExtras | None = None) -> torch.Tensor:
    """Encoder output (len(rows), m) for cached prompts."""
    extras = extras or PromptExtras()
    outs = [encoder.activate(encoder_run(encoder, cache, layer, rows[b:b + batch], extras))
            for b in range(0, len(rows), batch)]
    return torch.cat(outs)


def feature_fidelity(codec: FeatureCodec, predicted: torch.Tensor, true: torch.Tensor, reference: torch.Tensor
                     ) -> dict[str, dict[str, float]]:
    """Per feature, on decoded values: numeric MAE in raw units (and a predict-the-mean baseline),
    category/bool accuracy (missing counts as its own value) and a majority baseline."""
    pred, truth = codec.decode(predicted.numpy()), codec.decode(true.numpy())
    ref = codec.decode(reference.numpy())
    out: dict[str, dict[str, float]] = {}
    for f in codec.features:
        p = [r[f.name] for r in pred]
        t = [r[f.name] for r in truth]
        if f.type in ("int", "float"):
            t_arr = np.asarray(t, dtype=float)
            mean = float(np.mean([r[f.name] for r in ref]))
            out[f.name] = {"mae": float(np.abs(np.asarray(p, dtype=float) - t_arr).mean()),
                           "mae_baseline": float(np.abs(mean - t_arr).mean()),
                           "range": float(f.hi - f.lo)}
        else:
            values = [r[f.name] for r in ref]
            majority = max(set(values), key=values.count)
            out[f.name] = {"accuracy": float(np.mean([a == b for a, b in zip(p, t, strict=True)])),
                           "accuracy_baseline": float(np.mean([majority == b for b in t]))}
    return out


@torch.no_grad()
def decoder_accuracy(decoder: Decoder, model: nn.Module, expert: nn.Module, cache: PromptCache, layer: int,
                     x_in: torch.Tensor, y: torch.Tensor, rows: Sequence[int], token_ids: list[int],
                     batch: int = 32, end_of_turn: int | None = None, per_row: bool = False) -> dict:
    """LLM answer (argmax over class tokens at the last slot) vs the synthetic labels ``y[rows]`` and vs
    the expert's own argmax, with ``x_in`` (len(rows), m) fed to the expert (true or encoded features);
    with ``end_of_turn`` (and cached answer states), how often the model's next token after its own
    answer ends the turn (``ends_turn_after_answer``); ``per_row`` adds ``agrees`` (len(rows),) bool."""
    preds, expert_preds, ends, end_p = [], [], [], []
    for b in range(0, len(rows), batch):
        idx = list(rows[b:b + batch])
        p = expert(x_in[b:b + batch]).float()
        slots = decoder(p)
        logits, _ = slot_class_logits(model, cache, layer, slots, idx, token_ids)
        preds.append(logits.argmax(-1))
        expert_preds.append((p[:, 0] > 0.5).long() if p.shape[1] == 1 else p.argmax(-1))
        if end_of_turn is not None and all(i in cache.answers for i in idx):
            answer = torch.stack([cache.answers[i][int(c)] for i, c in zip(idx, preds[-1], strict=True)]).float()
            _, after = slot_class_logits(model, cache, layer, slots, idx, token_ids, answer)
            ends.append(after.argmax(-1) == end_of_turn)
            end_p.append(torch.softmax(after, -1)[:, end_of_turn])
    pred, e_pred, truth = torch.cat(preds), torch.cat(expert_preds), y[list(rows)]
    out = {"accuracy": float((pred == truth).float().mean()),
           "expert_accuracy": float((e_pred == truth).float().mean()),
           "agreement_with_expert": float((pred == e_pred).float().mean())}
    if per_row:
        out["agrees"] = pred == e_pred
    if ends:
        out["ends_turn_after_answer"] = float(torch.cat(ends).float().mean())
        out["end_of_turn_probability"] = float(torch.cat(end_p).mean())
    return out
