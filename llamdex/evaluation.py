"""Scoring on real rows: evaluation questions, the paper's baselines, and who may read which split.

**Splits and families** (:func:`eval_set`): questions are written from real rows of one split in
one phrasing family, and only these pairs exist:

* ``validation`` rows (:mod:`llamdex.datasets`) in the ``validation`` family
  (``llamdex/validation_family.json``; also the old ``heldout`` family and the ``train`` grammar,
  for comparisons) -- what every design choice, ablation and default is made on;
* ``test`` rows in the blind ``test`` family (``llamdex/heldout_family.json``) or the old
  ``heldout`` family (its numbers beside the new ones) -- read only by ``bench/llamdex_accuracy.py
  --split test``, the final number (a test checks that no other tool asks for the test split).

The test family on validation rows, or the validation family on test rows, is refused.

Used by ``bench/llamdex_*``; plain torch, no Ray. Every scorer returns class
probabilities (N, K) in ``target.classes`` order, so one :func:`accuracy` fits all rows of the
table:

* :func:`llamdex_scores` — the serving path (:func:`llamdex.insertion.predict_many`): slots
  appended, overwritten at layer k, class-token softmax at the last slot; also returns the
  features the encoder read (for extraction fidelity);
* :func:`base_llm_scores` — the base LLM alone on the same prompt (same one-word system
  prompt), class-token softmax at the last prompt position (the paper's "original LLM");
* :func:`expert_scores` — an expert on given features (true features = the upper bound).

The Expert-API baseline lives in :mod:`llamdex.expert_api`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from causal_lm import backbone, left_pad, stop_token_ids
from llamdex.codec import FeatureCodec
from llamdex.datasets import DatasetSplits
from llamdex.expert import ExpertMLP, predict_proba
from llamdex.family import FamilyRenderer, family_file
from llamdex.insertion import Bundle, predict_many, prefill_with_experts
from llamdex.llm_ops import class_logits
from llamdex.prompting import AnswerTokens, chat_prompt_ids
from llamdex.questions import QuestionGenerator
from llamdex.render import Question
from llamdex.stages import feature_fidelity

FAMILIES_OF = {"validation": ("validation", "heldout", "train"), "test": ("test", "heldout")}
"""Which phrasing families may be written from which split's rows (the first is the default)."""


@dataclass(frozen=True)
class EvalSet:
    """Rows of one split (schema features + target index), their questions (text, spans, what was
    stated) in one family, and the encoded true features."""

    split: str
    family: str
    rows: pd.DataFrame
    composed: list[Question]
    x: np.ndarray  # (N, m) codec-encoded true features
    y: np.ndarray  # (N,) class indices

    @property
    def questions(self) -> list[str]:
        """The question texts."""
        return [q.text for q in self.composed]


def eval_set(splits: DatasetSplits, split: str, family: str | None = None, max_rows: int | None = None,
             seed: int = 0) -> EvalSet:
    """Questions written from real rows of ``split`` in phrasing ``family`` (see the module docstring for
    the allowed pairs; default: the split's own family). ``max_rows`` takes a seeded random subset."""
    if split not in FAMILIES_OF:
        raise ValueError(f"split: {split!r}; fix: use 'validation' (every choice) or 'test' (the final benchmark)")
    family = family or FAMILIES_OF[split][0]
    if family not in FAMILIES_OF[split]:
        raise ValueError(f"family: {family!r} may not be written from {split} rows (allowed: "
                         f"{list(FAMILIES_OF[split])}); fix: the test family is for test rows and the final "
                         "benchmark only, the validation family for validation rows")
    rows = getattr(splits, split)
    if max_rows is not None and len(rows) > max_rows:
        rows = rows.sample(n=max_rows, random_state=seed)
    rows = rows.reset_index(drop=True)
    schema = splits.schema
    features = rows[[f.name for f in schema.features]]
    records = features.to_dict(orient="records")
    if family in ("validation", "test"):
        renderer = FamilyRenderer(schema, family_file(family), seed=10_000 + seed)
        composed = [renderer.compose(r) for r in records]
    else:
        gen = QuestionGenerator(schema, seed=10_000 + seed)
        composed = [gen.compose(r, family) for r in records]  # type: ignore[arg-type]
    return EvalSet(split, family, rows, composed, FeatureCodec(schema).encode(features),
                   rows[schema.target.name].to_numpy(dtype=np.int64))


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose argmax class is the label."""
    return float((np.asarray(probs).argmax(1) == np.asarray(y)).mean())


def expert_scores(expert: ExpertMLP, x: np.ndarray) -> np.ndarray:
    """The expert's class probabilities on features ``x`` (N, m)."""
    return predict_proba(expert, x)


@torch.no_grad()
def llamdex_scores(model, tokenizer, bundle: Bundle, questions: Sequence[str], batch_size: int = 16
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class probabilities (N, K) at the last slot, encoded features (N, m), which features each
    question was read to state (N, F) bool) through the serving path."""
    probs, feats, stated = [], [], []
    names = [f.name for f in bundle.encoder.cfg.features]
    for b in range(0, len(questions), batch_size):
        chunk = list(questions[b:b + batch_size])
        for res in predict_many(model, tokenizer, [bundle] * len(chunk), chunk):
            probs.append([res["probabilities"][c] for c in bundle.spec.class_names])
            feats.append(res["encoded_features"])
            stated.append([n in res["stated"] for n in names])
    return np.asarray(probs, dtype=np.float64), np.asarray(feats, dtype=np.float32), np.asarray(stated, dtype=bool)


@torch.no_grad()
def base_llm_scores(model, tokenizer, answers: AnswerTokens, questions: Sequence[str], batch_size: int = 16
                    ) -> np.ndarray:
    """The base LLM alone: class-token softmax at the last prompt position (same prompt, no slots)."""
    prompts = chat_prompt_ids(tokenizer, answers.system_prompt, list(questions))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for b in range(0, len(prompts), batch_size):
        ids, mask, pos = left_pad(prompts[b:b + batch_size], pad)
        hidden = backbone(model)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
        out.append(torch.softmax(class_logits(model, hidden, answers.ids).float(), -1))
    return torch.cat(out).numpy().astype(np.float64)


def extraction_fidelity(codec: FeatureCodec, encoded: np.ndarray, true: np.ndarray, reference: np.ndarray
                        ) -> dict[str, dict[str, float]]:
    """Per feature: MAE in raw units (numeric) or accuracy (category/bool), each with its naive
    baseline (predict the reference mean / majority), on decoded values."""
    return feature_fidelity(codec, torch.as_tensor(encoded), torch.as_tensor(true), torch.as_tensor(reference))


@torch.no_grad()
def chat_replies(model, tokenizer, bundle: Bundle, questions: Sequence[str], max_new_tokens: int = 16,
                 batch_size: int = 8) -> list[str]:
    """What chat to an expert says, as the serving engine does it: the slots' class answer token first
    (forced), then greedy decoding until the end of the turn or ``max_new_tokens``; decoded replies."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_ids = bundle.spec.class_token_ids
    replies = []
    for b in range(0, len(questions), batch_size):
        prompts = [chat_prompt_ids(tokenizer, bundle.spec.system_prompt, [q])[0] for q in questions[b:b + batch_size]]
        ids, mask, pos = left_pad(prompts, pad)
        logits, past, mask, pos = prefill_with_experts(model, ids, mask, pos, [bundle] * len(prompts), tokenizer)
        nxt = torch.tensor(token_ids)[logits[:, token_ids].argmax(-1)]
        out, done = [[int(t)] for t in nxt], [False] * len(prompts)
        for _ in range(max_new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            step = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                         use_cache=True)
            past, nxt = step.past_key_values, step.logits[:, -1].argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    done[r] = t in stops
                    if not done[r]:
                        out[r].append(t)
            if all(done):
                break
        replies += [tokenizer.decode(o, skip_special_tokens=True) for o in out]
    return replies


_WORD = re.compile(r"[A-Za-z']+")


def fluent(reply: str, answers: Sequence[str]) -> bool:
    """Whether a chat reply is the answer word, then nothing or one short well-formed sentence: at most
    20 words ending in '.', '!' or ')', no other answer word (no "Yes, no, no, ..."), no word three
    times. What noise after an untrained answer looks like fails it ("Yes, no, no, the documentary",
    "No or No, which, when added")."""
    text = reply.strip()
    first = next((a for a in sorted(answers, key=len, reverse=True) if text.startswith(a)), None)
    if first is None:
        return False
    rest = text[len(first):].strip()
    if not rest.strip(".!"):
        return True
    words = [w.lower() for w in _WORD.findall(rest)]
    others = {a.lower() for a in answers if len(a) > 1}  # answer words, any case; letters only as capitals
    letters = {a for a in answers if len(a) == 1} & set(re.findall(r"\b[A-Z]\b", rest))
    if not words or len(words) > 20 or others & set(words) or letters or rest[-1] not in ".!)":
        return False
    return max(words.count(w) for w in words) < 3
