"""Writing values into questions: value forms shared by every phrasing grammar, and value spans.

Every grammar (the training grammar in :mod:`llamdex.questions`, the phrasing families of
:mod:`llamdex.family`) writes a value through :class:`ValueWriter`, so a value can look the same
whatever the surrounding phrasing: digits, thousands separators, number words, a currency symbol,
the unit or one of its aliases, a count word before a noun ("no siblings", "a parent"), a
category's name or one of its synonyms, a yes/no word or a bool's own phrase ("has a mortgage").

While a question is built, each feature's value (and label) is wrapped in invisible markers
(:func:`mark`); :func:`unmark` strips them and returns the character spans, which become the
encoder's copy targets (where the value is written) and let tests check what was written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamdex.codec import to_bool
from llamdex.schema import FeatureSpec
from llamdex.vocabulary import (
    abbreviations,
    category_code,
    currency_symbol,
    labels,
    number_words,
    phrase_values,
    record_keys,
    unit_forms,
    value_phrases,
)

CODE_SHARE = 0.25  # of an ordinal category's values in records, the share written as its bare number
PRONOUNS = frozenset("he him his she her hers they them their theirs it its".split())
VALUE, LABEL, CLOSE, INDEX_BASE = "\x02", "\x04", "\x03", 0xE000
_OPENS = (VALUE, LABEL)
_MARKS = re.compile("([\x02\x04])([\ue000-\uf8ff]+)(.*?)\x03", re.DOTALL)


def mark(index: int | tuple[int, ...], text: str, what: str = VALUE) -> str:
    """Wrap feature ``index``'s rendered value (or label) in markers that :func:`unmark` turns into a span;
    a tuple of indices marks one phrase that states several features ("travelling alone")."""
    indices = index if isinstance(index, tuple) else (index,)
    return what + "".join(chr(INDEX_BASE + i) for i in indices) + text + CLOSE


def unmark(text: str) -> tuple[str, dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """Strip :func:`mark` markers: (plain text, feature index -> character span of its value, and of its label)."""
    plain, values, labels_ = unmark_all(text)
    return plain, {i: s[0] for i, s in values.items()}, {i: s[0] for i, s in labels_.items()}


def unmark_all(text: str) -> tuple[str, dict[int, list[tuple[int, int]]], dict[int, list[tuple[int, int]]]]:
    """Like :func:`unmark`, with every marked span of a feature (a value may be written more than once,
    e.g. a pronoun that says 'female')."""
    parts: list[str] = []
    spans: dict[str, dict[int, list[tuple[int, int]]]] = {VALUE: {}, LABEL: {}}
    pos = last = 0
    for m in _MARKS.finditer(text):
        parts.append(text[last:m.start()])
        pos += m.start() - last
        inner = m.group(3)
        for index in m.group(2):
            spans[m.group(1)].setdefault(ord(index) - INDEX_BASE, []).append((pos, pos + len(inner)))
        parts.append(inner)
        pos += len(inner)
        last = m.end()
    parts.append(text[last:])
    return "".join(parts), spans[VALUE], spans[LABEL]


def cap(text: str) -> str:
    """Upper-case the first letter unless the first word already has capitals (e.g. 'pH')."""
    if text[:1] in _OPENS:  # a marker is not a letter: capitalise what it wraps
        return text[:2] + cap(text[2:])
    first = text.split(" ", 1)[0]
    return text[:1].upper() + text[1:] if text[:1].islower() and first == first.lower() else text


def lower_first(text: str) -> str:
    """'Did the ...' -> 'did the ...'; leaves 'I ...', 'pH ...', 'NASA ...' alone."""
    first = text.split(" ", 1)[0]
    keep = first == "I" or first[1:] != first[1:].lower()
    return text if keep else text[:1].lower() + text[1:]


def article(word: str) -> str:
    """'apple' -> 'an apple', 'passenger' -> 'a passenger'."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


_SENTENCE_START = re.compile(r"(^|[.!?]\s+|\n\s*)((?:[\x02\x04].)?)([a-z])")
_ABBREVIATION = re.compile(r"(?:^|[\s(])(?:e\.g|i\.e|approx|appr|prob|est|etc|ca|abt|vs|nr|no|yrs|incl|resp)\.\s+$",
                           re.IGNORECASE)


def sentence_case(text: str) -> str:
    """Capitalise the first letter of every sentence and line (markers are skipped; 'pH' is kept, and
    a word after an abbreviation's full stop such as 'prob.' or 'approx.' is left alone)."""
    def up(m: re.Match) -> str:
        rest = text[m.end(3) - 1:].split(" ", 1)[0]
        if rest[1:] != rest[1:].lower():  # pH, mRNA: leave as written
            return m.group(0)
        if m.group(1).startswith(".") and _ABBREVIATION.search(text[max(0, m.start() - 12):m.start() + len(m.group(1))]):
            return m.group(0)
        return m.group(1) + m.group(2) + m.group(3).upper()
    return _SENTENCE_START.sub(up, text)


@dataclass
class Question:
    """A generated question: full ``text``, the phrasing family it came from, the clause written for
    each feature and the character spans of each written value and label in ``text`` (for the
    encoder's copy pointer). Features in ``stated`` were written with their value; the others were
    left out or written as unknown."""

    text: str
    family: str
    clauses: dict[str, str] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    label_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    stated: frozenset[str] = frozenset()
    value_spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # every span, if several

    def all_spans(self, name: str) -> list[tuple[int, int]]:
        """Every span where feature ``name``'s value is written (empty if it is not stated)."""
        return self.value_spans.get(name) or ([self.spans[name]] if name in self.spans else [])


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


def with_thousands(digits: str) -> str:
    """'-1234.5' -> '-1,234.5'."""
    sign, body = ("-", digits[1:]) if digits.startswith("-") else ("", digits)
    whole, _, frac = body.partition(".")
    return sign + f"{int(whole):,}" + ("." + frac if frac else "")


def as_number(f: FeatureSpec, value: Any) -> float:
    """The value of a numeric feature as a float (ValueError naming the feature otherwise)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{f.name}: {value!r} is not a number; fix: give a numeric value") from None


class ValueWriter:
    """Picks how one value is written; ``short`` allows record shorthand (single letters, abbreviations)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def numbers(self, f: FeatureSpec, value: Any) -> list[str]:
        """Every bare form of a number: digits, thousands separators, words (whole numbers up to 999,999)."""
        number = as_number(f, value)
        digits = format_number(number, f)
        forms = [digits]
        if abs(number) >= 1000:
            forms.append(with_thousands(digits))
        if float(digits) == int(float(digits)) and 0 <= int(float(digits)) <= 999_999:
            forms.append(number_words(int(float(digits))))
        return forms

    def number(self, f: FeatureSpec, value: Any, unit_share: float = 0.5, words: bool = True,
               phrases: bool = True, avoid: frozenset[str] = frozenset()) -> str:
        """A numeric value: a bare form, maybe with its unit (or currency symbol), or one of the
        feature's phrases for exactly this value ('never contacted before' for pdays -1) that is not
        in ``avoid`` (lower case: phrases the rest of the row would contradict)."""
        rng = self.rng
        number = as_number(f, value)
        if phrases:
            special = [p for v, ps in zip(phrase_values(f), value_phrases(f), strict=True) if v == number
                       for p in ps if p.lower() not in avoid]
            if special and rng.random() < 0.5:
                return rng.choice(special)
        forms = self.numbers(f, value)
        text = rng.choice(forms if words else forms[:2])
        units = unit_forms(f)
        if units and rng.random() < unit_share:
            symbol = currency_symbol(f)
            if symbol and text[:1].isdigit() and rng.random() < 0.5:
                return symbol + text
            unit = rng.choice(units)
            glue = "" if text[-1:].isdigit() and len(unit) <= 3 and " " not in unit and rng.random() < 0.3 else " "
            return f"{text}{glue}{unit}"
        return text

    def count(self, f: FeatureSpec, value: Any) -> tuple[str, str]:
        """(count word, noun) for a count: 'no'/'zero' + plural, 'a'/'one' + singular, else a number + plural."""
        rng = self.rng
        n = int(round(as_number(f, value)))
        singular, plural = rng.choice(f.nouns)
        if n == 0:
            return rng.choice(["no", "no", "zero", "0"]), plural
        if n == 1:
            return rng.choice(["an" if singular[:1] in "aeiou" else "a", "one", "1"]), singular
        return rng.choice([str(n), number_words(n) if n <= 999_999 else str(n)]), plural

    def category(self, f: FeatureSpec, value: Any, short: bool = False) -> str:
        """A category's name (a third of the time) or one of its synonyms/derived forms; pronouns are
        read but never written as values; single letters and class codes ("3" for third) only in ``short``
        (record) styles."""
        assert f.categories is not None
        text = value if isinstance(value, str) else str(value)
        if text not in f.categories:
            raise ValueError(f"{f.name}: unknown category {value!r}; fix: use one of {f.categories}")
        phrases = value_phrases(f)[f.categories.index(text)]
        code = category_code(text) if short else None
        if code is not None and self.rng.random() < CODE_SHARE:  # records write class codes: 'pclass=1'
            return code
        usable = [p for p in phrases[1:] if p.lower() not in PRONOUNS and (short or len(p) > 1)]
        if not usable or self.rng.random() < 1 / 3:
            return phrases[0]
        return self.rng.choice(usable)

    def answer(self, f: FeatureSpec, value: Any) -> str:
        """A yes/no word for a bool."""
        yes = to_bool(value, f.name)
        return self.rng.choice([("yes", "no"), ("Yes", "No"), ("true", "false")])[0 if yes else 1]

    def phrase(self, f: FeatureSpec, value: Any) -> str | None:
        """One of the schema's own phrases for a bool's truth value ('has a mortgage'), or None."""
        yes = to_bool(value, f.name)
        own = [p for p in f.synonyms.get("true" if yes else "false", [])]
        return self.rng.choice(own) if own else None

    def label(self, f: FeatureSpec) -> str:
        """One of the feature's labels (description, aliases, name)."""
        return self.rng.choice(labels(f))

    def key(self, f: FeatureSpec, short: bool = False) -> str:
        """A record key for the feature (its table name; abbreviations too in ``short`` styles)."""
        return self.rng.choice(record_keys(f) + (abbreviations(f) if short else []))
