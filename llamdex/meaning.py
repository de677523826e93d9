"""Categories described in the user's own words: the encoder's fallback for what it cannot point at.

The encoder copies a category only from a *mention* of one of its values (a name, a synonym, an
ordinal form: :func:`llamdex.vocabulary.value_phrases`). People describe the same values in words
no schema lists: "money is tight" for nursery's ``finance = inconv``, "we're both doctors on long
shifts" for ``parents = great_pret``. Such a feature is read as "not stated", and the expert gets
a missing category.

:class:`MeaningReader` reads those features by meaning instead. It cuts the user's message into
clauses, embeds them with a sentence-embedding model (:mod:`llamdex.embedding`, all-MiniLM-L6-v2
from a PyPI wheel) and compares each clause with every value's phrases, each written with its
feature's description ("money problems (financial standing of the family)"). A feature the
encoder left unstated takes value v from clause c only when all of these hold:

* ``threshold``: c is at least this close (cosine) to one of v's phrases;
* ``margin``: v beats the feature's runner-up value on c by this much (the clause picks a value);
* ``over_label``: v's phrase is closer to c than the feature's bare label is, by this much (the
  clause says *which* value, not just which topic: "Housing:" or "health was not noted" fill
  nothing);
* c is not the schema's target question itself ("how should this nursery application be ranked?"
  is close to "good nursery", and reads nothing);
* c is closer to v than to any value of any other feature (a clause about housing never fills
  finance, and a clause about a stated feature never fills an unstated one).

c is the clause closest to one of the feature's values; with ``fallback`` the closest clause that
passes every check (a message may mention a feature twice, once in passing).

The three thresholds are chosen on a validation set only (docs/llamdex.md, "Meaning reader"); a
read says which clause it came from and how close it was, and the predict response reports it.
Only categories are read this way: numbers and bools have literal forms the encoder copies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from llamdex.embedding import Embedder
from llamdex.schema import FeatureSpec, TenantSchema
from llamdex.vocabulary import labels, value_phrases

_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSES = re.compile(r"(?<=[;:])\s+|,\s*(?:(?:and|but|or|so)\s+)?|\s+-+\s+|[()|/]|\s+(?:and|but|while|though|although|so|because|plus|with)\s+",
                      re.IGNORECASE)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>")
_ROLES = {"system", "user", "assistant"}
QUESTION_CUT = 0.8
"""A clause this close (cosine) to the schema's target question *is* that question and reads nothing."""


class MeaningConfig(BaseModel):
    """How sure the meaning reader must be (cosines of unit sentence embeddings; see the module
    docstring). Defaults: chosen on the nursery validation set written in everyday words."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(default=0.3, ge=-1, le=1)
    margin: float = Field(default=0.03, ge=0, le=2)
    over_label: float = Field(default=0.025, ge=-2, le=2)
    fallback: bool = False
    """When the clause closest to a feature's values fails a check, read the closest clause that passes
    them all (else only the closest clause is tried)."""


@dataclass(frozen=True)
class MeaningRead:
    """One category read by meaning: the value, the clause it was read from, and the cosine."""

    feature: str
    value: str
    clause: str
    similarity: float


def clauses(text: str) -> list[str]:
    """The message cut into sentences, then clauses (commas, semicolons, brackets, conjunctions);
    chat-template markup, role names and one-letter pieces are dropped; duplicates once."""
    text = _SPECIAL.sub("\n", text)
    out: list[str] = []
    for sentence in _SENTENCES.split(text):
        for piece in _CLAUSES.split(sentence):
            piece = (piece or "").strip(" \t.!?;:'\"")
            if len(piece) > 2 and piece.lower() not in _ROLES:
                out.append(piece)
    return list(dict.fromkeys(out))


def user_text(prompt_text: str, system_prompt: str | None) -> str:
    """The user's part of a decoded chat prompt: the system prompt removed (its words would
    otherwise be read as the user's)."""
    return prompt_text.replace(system_prompt, "\n") if system_prompt else prompt_text


class MeaningReader:
    """Reads a schema's category features by meaning (see the module docstring)."""

    def __init__(self, schema: TenantSchema, embedder: Embedder, config: MeaningConfig | None = None):
        self.config = config or MeaningConfig()
        self.embedder = embedder
        self.features: list[FeatureSpec] = [f for f in schema.features if f.type == "category"]
        texts, owner = [], []
        for i, f in enumerate(self.features):
            topic = f.description or f.name.replace("_", " ")
            for v, phrases in enumerate(value_phrases(f)):
                for p in phrases:
                    texts.append(f"{p} ({topic})")
                    owner.append((i, v))
        self._owner = np.asarray(owner, dtype=np.int64).reshape(-1, 2)
        self._values = embedder.encode(texts) if texts else np.zeros((0, 1), np.float32)
        self._labels = [embedder.encode(list(dict.fromkeys([*labels(f), f"{f.description or f.name}:"])))
                        for f in self.features]
        self._task = embedder.encode([schema.target.question]) if schema.target.question else None
        self._width = max((len(f.categories or []) for f in self.features), default=0)

    def read(self, text: str, skip: Sequence[str] = ()) -> dict[str, MeaningRead]:
        """The category features of ``text`` read by meaning, except those in ``skip`` (the ones the
        encoder already read)."""
        skipped = set(skip)
        todo = [i for i, f in enumerate(self.features) if f.name not in skipped]
        pieces = clauses(text)
        if not todo or not pieces or not len(self._values):
            return {}
        emb = self.embedder.encode(pieces)
        if self._task is not None:  # the task's own question ("how should this application be ranked?")
            asks = (emb @ self._task.T)[:, 0] >= QUESTION_CUT
            emb = np.where(asks[:, None], 0.0, emb).astype(np.float32)
        sim = emb @ self._values.T  # (clauses, phrases)
        best = np.full((len(pieces), len(self.features), self._width), -2.0, dtype=np.float32)
        np.maximum.at(best, (slice(None), self._owner[:, 0], self._owner[:, 1]), sim)
        per_feature = best.max(-1)  # (clauses, features)
        cfg, out = self.config, {}
        for i in todo:
            f = self.features[i]
            k = len(f.categories or [])
            scores = best[:, i, :k]
            ranked = np.sort(scores, axis=1)
            top = ranked[:, -1]
            runner_up = ranked[:, -2] if k > 1 else np.full_like(top, -2.0)
            others = np.delete(per_feature, i, axis=1).max(1) if len(self.features) > 1 else np.full_like(top, -2.0)
            label = (emb @ self._labels[i].T).max(1)
            passes = ((top >= cfg.threshold) & (top - runner_up >= cfg.margin) & (top - label >= cfg.over_label)
                      & (top >= others))
            c = int(np.where(passes, top, -np.inf).argmax() if cfg.fallback else top.argmax())
            if passes[c]:
                v = int(scores[c].argmax())
                out[f.name] = MeaningRead(f.name, str(f.categories[v]), pieces[c], round(float(top[c]), 4))
        return out
