"""Does a prompt state anything a Llamdex expert could read?

An expert answers from the feature values its connectors read in the prompt; a prompt that states
none ("What is the pH of lemon juice?" to a wine-quality expert, "How long did the Titanic take to
build?") would be answered from the schema's defaults alone -- the same answer for every such
prompt. So ``auto`` sends a prompt to an expert only when it states values of the expert's
features, found with the connectors' own vocabulary: a category's or bool's value phrases
(its name, synonyms and ordinal forms: "third class", "a woman", "no mortgage"), or a number
(digits, words, ordinals) inside some numeric feature's range. Cheap (regular expressions, no
model), and a rule about what an expert can use. How many values it takes (``min_values``, default
2: one value alone -- "red wine", "a 40-year-old" -- is a mention, not a case to predict) was chosen on
the routing benchmark's validation files (bench/routing.py).
"""

from __future__ import annotations

import re

from llamdex.literals import NUMBER, find_literals, value_matcher
from llamdex.schema import TenantSchema, load_schema
from llamdex.vocabulary import value_phrases


class FeatureEvidence:
    """Which of one schema's features a prompt states a value of."""

    def __init__(self, schema: TenantSchema | dict):
        self.schema = load_schema(schema) if isinstance(schema, dict) else schema
        self._phrases: list[tuple[str, re.Pattern]] = []
        for f in self.schema.features:
            if f.type not in ("category", "bool"):
                continue
            # the connectors' own matcher; one- and two-letter forms ("F", "1") say too little alone
            matcher = value_matcher(tuple(tuple(p for p in ps if len(p.strip()) > 2) for ps in value_phrases(f)))
            if matcher is not None:
                self._phrases.append((f.name, matcher[0]))
        self._ranges = [(f.lo, f.hi) for f in self.schema.features if f.type in ("int", "float")]

    def stated(self, prompt: str) -> list[str]:
        """What the prompt states that the expert could read: the names of the category/bool features
        whose value it writes, then each distinct number some numeric feature's range admits (as written
        by :func:`_number`, e.g. ``"40"``)."""
        out, spans = [], []
        for name, pattern in self._phrases:
            found = list(pattern.finditer(prompt))
            if found:
                out.append(name)
                spans += [m.span() for m in found]
        numbers = (lit.value for lit in find_literals(prompt) if lit.kind == NUMBER
                   and not any(s <= lit.start < e for s, e in spans))  # "third" of "third class" is pclass's
        out += list(dict.fromkeys(_number(v) for v in numbers if any(lo <= v <= hi for lo, hi in self._ranges)))
        return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def feature_evidence(schema: dict | None) -> FeatureEvidence | None:
    """The evidence finder of an expert's public schema, or None when the schema is missing or unusable
    (then no evidence is required: the other signals decide)."""
    if not schema:
        return None
    try:
        return FeatureEvidence(schema)
    except (ValueError, KeyError, TypeError):
        return None
