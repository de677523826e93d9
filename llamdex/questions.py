"""Natural-language questions from a row + schema, by a compositional template grammar.

Deviation from the paper (documented): the paper paraphrases every row with Mistral-7B; we
compose questions from per-field phrasings instead (no LLM, deterministic by seed, cheap).
The probe in the Llamdex notes shows that what matters is diversity: so each question draws,
independently per field, a clause template, a label (description, name or alias), a number
format (digits, thousands separators, words, with or without unit), then shuffles the field
order, picks a body layout, separators, an opener, irrelevant distractor sentences and a way
to wrap the target question, which always comes last. Missing values are left out.

Phrasings come in two disjoint families (see :mod:`llamdex.phrasings`): ``train`` for
connector training and ``heldout`` for evaluation/test questions only.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llamdex.codec import is_missing, to_bool
from llamdex.phrasings import FAMILIES, PHRASINGS, PROCEDURAL_SHARE, Family, PhrasingFamily
from llamdex.schema import FeatureSpec, TenantSchema, load_schema

_LIST_MARKS = {"dashes": "-", "stars": "*", "bullets": "•", "arrows": ">"}  # list markers carry no digits (numbers are values)
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999, e.g. 42 -> 'forty-two' (used as one number format)."""
    if not 0 <= n <= 999:
        raise ValueError(f"n: {n} is outside 0..999; fix: use digits for this value")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("-" + _ONES[ones] if ones else "")
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + (" and " + number_words(rest) if rest else "")


def format_number(value: float, feature: FeatureSpec) -> str:
    """Canonical digits of a value: ints as integers, floats rounded to ``decimals`` with trailing
    zeros stripped (22.0 -> '22', 7.2500 -> '7.25'); what a reader must be able to recover."""
    if feature.type == "int":
        return str(int(round(float(value))))
    if feature.decimals is not None:
        text = f"{round(float(value), feature.decimals):.{feature.decimals}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
    else:
        text = np.format_float_positional(float(value), precision=6, unique=True, trim="-")
    return "0" if text == "-0" else text


def _with_thousands(digits: str) -> str:
    sign, body = ("-", digits[1:]) if digits.startswith("-") else ("", digits)
    whole, _, frac = body.partition(".")
    return sign + f"{int(whole):,}" + ("." + frac if frac else "")


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _cap(text: str) -> str:
    """Upper-case the first letter unless the first word already has capitals (e.g. 'pH')."""
    if text[:1] in _OPENS:  # a marker (see _mark) is not a letter: capitalise what it wraps
        return text[:2] + _cap(text[2:])
    first = text.split(" ", 1)[0]
    return text[:1].upper() + text[1:] if text[:1].islower() and first == first.lower() else text


_VALUE, _LABEL, _CLOSE, _INDEX_BASE = "\x02", "\x04", "\x03", 0xE000
_OPENS = (_VALUE, _LABEL)
_MARKS = re.compile("([\x02\x04])(.)(.*?)\x03", re.DOTALL)


def _mark(index: int, text: str, what: str = _VALUE) -> str:
    """Wrap feature ``index``'s rendered value (or label) in markers that :func:`_unmark` turns into a span."""
    return f"{what}{chr(_INDEX_BASE + index)}{text}{_CLOSE}"


def _unmark(text: str) -> tuple[str, dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """Strip :func:`_mark` markers: (plain text, feature index -> character span of its value, and of its label)."""
    parts: list[str] = []
    spans: dict[str, dict[int, tuple[int, int]]] = {_VALUE: {}, _LABEL: {}}
    pos = last = 0
    for m in _MARKS.finditer(text):
        parts.append(text[last:m.start()])
        pos += m.start() - last
        inner = m.group(3)
        spans[m.group(1)][ord(m.group(2)) - _INDEX_BASE] = (pos, pos + len(inner))
        parts.append(inner)
        pos += len(inner)
        last = m.end()
    parts.append(text[last:])
    return "".join(parts), spans[_VALUE], spans[_LABEL]


def _lower_first(text: str) -> str:
    """'Did the ...' -> 'did the ...'; leaves 'I ...', 'pH ...', 'NASA ...' alone."""
    first = text.split(" ", 1)[0]
    keep = first == "I" or first[1:] != first[1:].lower()
    return text if keep else text[:1].lower() + text[1:]


@dataclass
class Question:
    """A generated question: full ``text``, the clause written for each present feature and the
    character spans of each present feature's value and label in ``text`` (for the encoder's copy pointer)."""

    text: str
    family: Family
    clauses: dict[str, str] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    label_spans: dict[str, tuple[int, int]] = field(default_factory=dict)


class QuestionGenerator:
    """Writes questions about rows of one schema; deterministic for a given seed and call order."""

    def __init__(self, schema: TenantSchema | dict | str, seed: int = 0):
        self.schema = load_schema(schema)
        self.rng = random.Random(seed)

    def make(self, row: Mapping[str, Any] | pd.Series, family: Family = "train") -> str:
        """One question about ``row`` using only phrasings of ``family`` ('train' or 'heldout')."""
        return self.compose(row, family).text

    def make_many(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]], family: Family = "train") -> list[str]:
        """One question per row (DataFrame rows or dicts)."""
        if isinstance(rows, pd.DataFrame):
            rows = rows.to_dict(orient="records")
        return [self.make(r, family) for r in rows]

    def compose(self, row: Mapping[str, Any] | pd.Series, family: Family = "train") -> Question:
        """Like :meth:`make` but also returns which clause encodes which feature (for tests/debugging)."""
        if family not in PHRASINGS:
            raise ValueError(f"family: {family!r} is not a phrasing family; fix: use one of {list(FAMILIES)}")
        ph = PHRASINGS[family]
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
        opener = rng.choice(ph.openers).format(a_subject=_article(subject), subject=subject)
        if opener:
            blocks.append(opener)
        style = rng.choice(ph.styles)
        blocks += self._body(order, style, ph, rng)
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # irrelevant context, between blocks only
            blocks.insert(rng.randint(0, len(blocks)), rng.choice(ph.distractors))
        q = self.schema.target.question.strip()
        blocks.append(_cap(rng.choice(ph.closers).format(q=q, ql=_lower_first(q))))
        joiner = "\n" if style in _LIST_MARKS else " "
        text, spans, label_spans = _unmark(joiner.join(blocks))
        names = [f.name for f in self.schema.features]
        return Question(text=text, family=family, clauses={k: _unmark(c)[0] for k, c in clauses.items()},
                        spans={names[i]: span for i, span in spans.items()},
                        label_spans={names[i]: span for i, span in label_spans.items()})

    def _body(self, clauses: list[str], style: str, ph: PhrasingFamily, rng: random.Random) -> list[str]:
        if not clauses:
            return []
        leadin = rng.choice(ph.leadins)
        if style == "sentences":
            return [_cap(c) + "." for c in clauses]
        if style in _LIST_MARKS:  # one block: a heading line, then one marked line per clause
            head = (leadin.strip() or "Details:").rstrip(":") + ":"
            return ["\n".join([head] + [f"{_LIST_MARKS[style]} {c}" for c in clauses])]
        sep = rng.choice(ph.separators)
        body = sep.join(clauses)
        if len(clauses) > 1 and sep == ", " and rng.random() < 0.5:
            body = ", ".join(clauses[:-1]) + " and " + clauses[-1]
        return [_cap(leadin + body) + "."]

    def _clause(self, index: int, f: FeatureSpec, value: Any, ph: PhrasingFamily, rng: random.Random) -> str:
        labels = list(dict.fromkeys(x for x in (f.description, f.name.replace("_", " "), *f.aliases) if x))
        label = _mark(index, rng.choice(labels), _LABEL)
        if f.type == "bool":
            yes, no = rng.choice(ph.yes_no)
            answer = _mark(index, yes if to_bool(value, f.name) else no)
            if ph.forward_words and rng.random() < PROCEDURAL_SHARE:
                return self._procedural(label, answer, ph, rng)
            return rng.choice(ph.boolean).format(label=label, answer=answer)
        if f.type == "category":
            text = value if isinstance(value, str) else str(value)
            if f.categories is not None and text not in f.categories:
                raise ValueError(f"{f.name}: unknown category {value!r}; fix: use one of {f.categories}")
            rendered, templates = text.replace("_", " "), ph.category
        else:
            rendered, templates = self._number(f, value, rng), ph.numeric
        rendered = _mark(index, rendered)
        if ph.forward_words and rng.random() < PROCEDURAL_SHARE:
            return self._procedural(label, rendered, ph, rng)
        return rng.choice(templates).format(label=label, value=rendered)

    @staticmethod
    def _procedural(label: str, value: str, ph: PhrasingFamily, rng: random.Random) -> str:
        """``label w.. value`` (1-5 random connector words) or ``value w.. label`` (1-4 connectors)."""
        if rng.random() < 0.65:
            words = [rng.choice(ph.forward_words) for _ in range(rng.choice((1, 1, 2, 2, 3, 3, 4, 5)))]
            return " ".join([label, *words, value])
        words = [rng.choice(ph.backward_words) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
        return " ".join([value, *words, label])

    @staticmethod
    def _number(f: FeatureSpec, value: Any, rng: random.Random) -> str:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{f.name}: {value!r} is not a number; fix: give a numeric value") from None
        digits = format_number(number, f)
        forms = [digits, digits]
        if abs(number) >= 1000:
            forms.append(_with_thousands(digits))
        if f.type == "int" and 0 <= int(digits) <= 100:
            forms.append(number_words(int(digits)))
        text = rng.choice(forms)
        if f.unit and rng.random() < 0.6:
            text = f"{text} {f.unit}"
        return text
