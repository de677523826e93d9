"""Scoring on real test rows: questions in the held-out phrasing family, and the paper's baselines.

Used by ``bench/llamdex_accuracy.py``; plain torch, no Ray. Every scorer returns class
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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from llamdex.codec import FeatureCodec
from llamdex.expert import ExpertMLP, predict_proba
from llamdex.insertion import Bundle, predict_many
from llamdex.llm_ops import class_logits, left_pad
from llamdex.prompting import AnswerTokens, chat_prompt_ids
from llamdex.questions import QuestionGenerator
from llamdex.schema import TenantSchema
from llamdex.stages import feature_fidelity


@dataclass(frozen=True)
class TestSet:
    """Test rows (schema features + target index), their questions and encoded true features."""

    rows: pd.DataFrame
    questions: list[str]
    x: np.ndarray  # (N, m) codec-encoded true features
    y: np.ndarray  # (N,) class indices


def make_test_set(schema: TenantSchema, test: pd.DataFrame, max_rows: int | None = None, seed: int = 0,
                  family: str = "heldout") -> TestSet:
    """Questions written from real test rows in phrasing ``family`` (default: never used in training).

    ``max_rows`` takes a seeded random subset (without replacement) of large test splits.
    """
    if max_rows is not None and len(test) > max_rows:
        test = test.sample(n=max_rows, random_state=seed)
    test = test.reset_index(drop=True)
    codec = FeatureCodec(schema)
    features = test[[f.name for f in schema.features]]
    questions = QuestionGenerator(schema, seed=10_000 + seed).make_many(features, family)  # type: ignore[arg-type]
    return TestSet(test, questions, codec.encode(features), test[schema.target.name].to_numpy(dtype=np.int64))


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose argmax class is the label."""
    return float((np.asarray(probs).argmax(1) == np.asarray(y)).mean())


def expert_scores(expert: ExpertMLP, x: np.ndarray) -> np.ndarray:
    """The expert's class probabilities on features ``x`` (N, m)."""
    return predict_proba(expert, x)


@torch.no_grad()
def llamdex_scores(model, tokenizer, bundle: Bundle, questions: Sequence[str], batch_size: int = 16
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, K) at the last slot, encoded features (N, m)) through the serving path."""
    probs, feats = [], []
    for b in range(0, len(questions), batch_size):
        chunk = list(questions[b:b + batch_size])
        for res in predict_many(model, tokenizer, [bundle] * len(chunk), chunk):
            probs.append([res["probabilities"][c] for c in bundle.spec.class_names])
            feats.append(res["encoded_features"])
    return np.asarray(probs, dtype=np.float64), np.asarray(feats, dtype=np.float32)


@torch.no_grad()
def base_llm_scores(model, tokenizer, answers: AnswerTokens, questions: Sequence[str], batch_size: int = 16
                    ) -> np.ndarray:
    """The base LLM alone: class-token softmax at the last prompt position (same prompt, no slots)."""
    prompts = chat_prompt_ids(tokenizer, answers.system_prompt, list(questions))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for b in range(0, len(prompts), batch_size):
        ids, mask, pos = left_pad(prompts[b:b + batch_size], pad)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
        out.append(torch.softmax(class_logits(model, hidden, answers.ids).float(), -1))
    return torch.cat(out).numpy().astype(np.float64)


def extraction_fidelity(codec: FeatureCodec, encoded: np.ndarray, true: np.ndarray, reference: np.ndarray
                        ) -> dict[str, dict[str, float]]:
    """Per feature: MAE in raw units (numeric) or accuracy (category/bool), each with its naive
    baseline (predict the reference mean / majority), on decoded values."""
    return feature_fidelity(codec, torch.as_tensor(encoded), torch.as_tensor(true), torch.as_tensor(reference))
