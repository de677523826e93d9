"""Questions from a row + schema: the training grammar and the old held-out family.

:class:`QuestionGenerator` writes a question about one row in a phrasing family: ``train`` is the
compositional training grammar (:mod:`llamdex.grammar`, the connectors' training data); ``heldout``
is the old held-out family of 8 templates (:data:`llamdex.phrasings.HELDOUT`), composed exactly as
before issue 16 so that its accuracy numbers stay comparable. The validation and test families are
JSON files rendered by :mod:`llamdex.family`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from llamdex.codec import is_missing, to_bool
from llamdex.grammar import TrainingGrammar
from llamdex.phrasings import FAMILIES, HELDOUT, Family, PhrasingFamily
from llamdex.render import (
    LABEL,
    Question,
    article,
    cap,
    format_number,
    lower_first,
    mark,
    unmark,
    with_thousands,
)
from llamdex.schema import FeatureSpec, TenantSchema, load_schema
from llamdex.vocabulary import number_words

__all__ = ["Question", "QuestionGenerator", "format_number", "number_words"]
_LIST_MARKS = {"dashes": "-", "stars": "*", "bullets": "•", "arrows": ">"}


class QuestionGenerator:
    """Writes questions about rows of one schema; deterministic for a given seed and call order."""

    def __init__(self, schema: TenantSchema | dict | str, seed: int = 0):
        self.schema = load_schema(schema)
        self.rng = random.Random(seed)
        self.grammar = TrainingGrammar(self.schema, self.rng)

    def make(self, row: Mapping[str, Any] | pd.Series, family: Family = "train") -> str:
        """One question about ``row`` using only phrasings of ``family`` ('train' or 'heldout')."""
        return self.compose(row, family).text

    def make_many(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]], family: Family = "train") -> list[str]:
        """One question per row (DataFrame rows or dicts)."""
        if isinstance(rows, pd.DataFrame):
            rows = rows.to_dict(orient="records")
        return [self.make(r, family) for r in rows]

    def compose(self, row: Mapping[str, Any] | pd.Series, family: Family = "train") -> Question:
        """Like :meth:`make` but also returns which clause encodes which feature and the value spans."""
        if family not in FAMILIES:
            raise ValueError(f"family: {family!r} is not a phrasing family; fix: use one of {list(FAMILIES)}")
        if family == "train":
            return self.grammar.compose(row)
        return self._legacy(row, HELDOUT)

    # ------------------------------------------------------------- the old held-out family, unchanged
    def _legacy(self, row: Mapping[str, Any] | pd.Series, ph: PhrasingFamily) -> Question:
        rng = self.rng
        clauses: dict[str, str] = {}
        for i, f in enumerate(self.schema.features):
            if f.name not in row:
                raise ValueError(f"row: feature {f.name!r} is absent; fix: include it (None/NaN if unknown)")
            if not is_missing(row[f.name]):
                clauses[f.name] = self._clause(i, f, row[f.name], ph, rng)
        order = list(clauses.values())
        rng.shuffle(order)
        subject = self.schema.subject
        blocks: list[str] = []
        opener = rng.choice(ph.openers).format(a_subject=article(subject), subject=subject)
        if opener:
            blocks.append(opener)
        style = rng.choice(ph.styles)
        blocks += self._body(order, style, ph, rng)
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # irrelevant context, between blocks only
            blocks.insert(rng.randint(0, len(blocks)), rng.choice(ph.distractors))
        q = self.schema.target.question.strip()
        blocks.append(cap(rng.choice(ph.closers).format(q=q, ql=lower_first(q))))
        joiner = "\n" if style in _LIST_MARKS else " "
        text, spans, label_spans = unmark(joiner.join(blocks))
        names = [f.name for f in self.schema.features]
        return Question(text=text, family="heldout", clauses={k: unmark(c)[0] for k, c in clauses.items()},
                        spans={names[i]: span for i, span in spans.items()},
                        label_spans={names[i]: span for i, span in label_spans.items()},
                        stated=frozenset(clauses))

    def _body(self, clauses: list[str], style: str, ph: PhrasingFamily, rng: random.Random) -> list[str]:
        if not clauses:
            return []
        leadin = rng.choice(ph.leadins)
        if style == "sentences":
            return [cap(c) + "." for c in clauses]
        if style in _LIST_MARKS:  # one block: a heading line, then one marked line per clause
            head = (leadin.strip() or "Details:").rstrip(":") + ":"
            return ["\n".join([head] + [f"{_LIST_MARKS[style]} {c}" for c in clauses])]
        sep = rng.choice(ph.separators)
        body = sep.join(clauses)
        if len(clauses) > 1 and sep == ", " and rng.random() < 0.5:
            body = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        return [cap(leadin + body) + "."]

    def _clause(self, index: int, f: FeatureSpec, value: Any, ph: PhrasingFamily, rng: random.Random) -> str:
        labels = list(dict.fromkeys(x for x in (f.description, f.name.replace("_", " "), *f.aliases) if x))
        label = mark(index, rng.choice(labels), LABEL)
        if f.type == "bool":
            yes, no = rng.choice(ph.yes_no)
            answer = mark(index, yes if to_bool(value, f.name) else no)
            return rng.choice(ph.boolean).format(label=label, answer=answer)
        if f.type == "category":
            text = value if isinstance(value, str) else str(value)
            if f.categories is not None and text not in f.categories:
                raise ValueError(f"{f.name}: unknown category {value!r}; fix: use one of {f.categories}")
            rendered, templates = text.replace("_", " "), ph.category
        else:
            rendered, templates = self._number(f, value, rng), ph.numeric
        return rng.choice(templates).format(label=label, value=mark(index, rendered))

    @staticmethod
    def _number(f: FeatureSpec, value: Any, rng: random.Random) -> str:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{f.name}: {value!r} is not a number; fix: give a numeric value") from None
        digits = format_number(number, f)
        forms = [digits, digits]
        if abs(number) >= 1000:
            forms.append(with_thousands(digits))
        if f.type == "int" and 0 <= int(digits) <= 100:
            forms.append(number_words(int(digits)))
        text = rng.choice(forms)
        if f.unit and rng.random() < 0.6:
            text = f"{text} {f.unit}"
        return text
