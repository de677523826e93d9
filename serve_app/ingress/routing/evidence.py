"""Does a prompt state anything a Llamdex expert could read?

An expert answers from the feature values its connectors read in the prompt; a prompt that states
none ("What is the pH of lemon juice?" to a wine-quality expert, "How long did the Titanic take to
build?") would be answered from the schema's defaults alone -- the same answer for every such
prompt. So ``auto`` sends a prompt to an expert only when it states a value of at least
``min_values`` of the expert's features, found with the connectors' own vocabulary:

* a category's, bool's or numeric special value's phrase (its name, synonyms and ordinal forms:
  "third class", "a woman", "no mortgage", "never contacted before") -- except one- and two-letter
  forms and phrases made only of English stop words ("may" the month is "may" the verb; "her",
  "third", "one" and "something else" say nothing about *which* feature alone);
* a number inside a numeric feature's range **bound to that feature**: the feature's name, an
  alias, its unit, a unit alias or a counted noun is written within :data:`BIND_CHARS` characters
  of it ("a 40-year-old", "balance: 1200", "3 calls", "pH 3.2"). A bare number is not evidence:
  contracts, invoices and recipes are full of numbers inside some feature's range ("within 30
  days", "£84,000", "clause 12") -- the routing benchmark's legal documents went to the bank
  expert that way.

Cheap (regular expressions, no model), and a rule about what an expert can use. ``min_values`` is
chosen per embedder on the routing benchmark's validation files (bench/routing.py): with the intent
adapter one bound feature scored 0.2 points above two, with plain MiniLM two scored 0.7 above one
(``DEFAULT_MIN_VALUES`` in serve_app/ingress/routing/__init__.py).
"""

from __future__ import annotations

import re

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from llamdex.literals import NUMBER, find_literals, value_matcher
from llamdex.schema import TenantSchema, load_schema
from llamdex.vocabulary import value_phrases

BIND_CHARS = 40  # a number and its feature's words are at most this far apart


def _says_something(phrase: str) -> bool:
    """A value phrase that names a value by itself: it has a word of three letters or more that is not an
    English stop word ("something else", a bank ``poutcome`` synonym, and titanic's "alone" or "on her own"
    are everyday words; "travelling alone" and "never contacted before" are not)."""
    return any(len(w) > 2 and w not in ENGLISH_STOP_WORDS for w in re.findall(r"[a-z0-9]+", phrase.lower()))


class FeatureEvidence:
    """Which of one schema's features a prompt states a value of."""

    says_something = staticmethod(_says_something)  # which value phrases count (a baseline may replace it)

    def __init__(self, schema: TenantSchema | dict, bound: bool = True):
        """``bound=False``: the rule before 2026-12-07 (a baseline of bench/routing.py): category and bool
        phrases of three letters or more, stop words included, and every distinct number inside some
        numeric feature's range, each counted as one value."""
        self.schema = load_schema(schema) if isinstance(schema, dict) else schema
        self.bound = bound
        self._phrases: list[tuple[str, re.Pattern]] = []
        self._numbers: list[tuple[str, float, float, re.Pattern]] = []  # bound: (feature, lo, hi, its words)
        self._ranges = [(f.lo, f.hi) for f in self.schema.features if f.type in ("int", "float")]
        for f in self.schema.features:
            keep = self.says_something if bound else (lambda p: len(p.strip()) > 2)
            matcher = value_matcher(tuple(tuple(p for p in ps if keep(p)) for ps in value_phrases(f)))
            if matcher is not None and (bound or f.type in ("category", "bool")):
                self._phrases.append((f.name, matcher[0]))
            if f.type in ("int", "float") and bound:
                words = {f.name.replace("_", " "), *(f.aliases or []), *(f.unit_aliases or []),
                         *(w for pair in f.nouns or [] for w in pair)} | ({f.unit} if f.unit else set())
                matcher = value_matcher((tuple(sorted(w for w in words if len(w.strip()) > 1)),))
                if matcher is not None:
                    self._numbers.append((f.name, f.lo, f.hi, matcher[0]))

    def stated(self, prompt: str) -> list[str]:
        """The names of the features whose value the prompt states (value phrases first, then numbers
        bound to a numeric feature), each once."""
        out, spans = [], []
        for name, pattern in self._phrases:
            found = list(pattern.finditer(prompt))
            if found:
                out.append(name)
                spans += [m.span() for m in found]
        numbers = [lit for lit in find_literals(prompt) if lit.kind == NUMBER
                   and not any(s <= lit.start < e for s, e in spans)]  # "third" of "third class" is pclass's
        if not self.bound:
            return out + list(dict.fromkeys(_number(lit.value) for lit in numbers
                                            if any(lo <= lit.value <= hi for lo, hi in self._ranges)))
        for name, lo, hi, words in self._numbers:
            if name in out:
                continue
            near = [m.span() for m in words.finditer(prompt)]
            if any(lo <= lit.value <= hi and any(_gap((lit.start, lit.end), w) <= BIND_CHARS for w in near)
                   for lit in numbers):
                out.append(name)
        return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """Characters between two spans (0 when they touch or overlap)."""
    return max(0, max(a[0], b[0]) - min(a[1], b[1]))


def feature_evidence(schema: dict | None) -> FeatureEvidence | None:
    """The evidence finder of an expert's public schema, or None when the schema is missing or unusable
    (then no evidence is required: the other signals decide)."""
    if not schema:
        return None
    try:
        return FeatureEvidence(schema)
    except (ValueError, KeyError, TypeError):
        return None
