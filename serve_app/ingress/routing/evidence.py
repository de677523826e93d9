"""Does a prompt state anything a Llamdex expert could read?

An expert answers from the feature values its connectors read in the prompt; a prompt that states
none ("What is the pH of lemon juice?" to a wine-quality expert, "How long did the Titanic take to
build?") would be answered from the schema's defaults alone -- the same answer for every such
prompt. So ``auto`` sends a prompt to an expert only when it states at least one value of the
expert's features, found with the connectors' own vocabulary: a category's or bool's value phrases
(its name, synonyms and ordinal forms: "third class", "a woman", "no mortgage"), or a number
(digits, words, ordinals) inside some numeric feature's range. Cheap (regular expressions, no
model), and a rule about what an expert can use, not a threshold.
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
        """Names of the category/bool features whose value the prompt writes, then ``"<number>"`` if it
        holds a number some numeric feature's range admits."""
        out = [name for name, pattern in self._phrases if pattern.search(prompt)]
        if any(lit.kind == NUMBER and any(lo <= lit.value <= hi for lo, hi in self._ranges)
               for lit in find_literals(prompt)):
            out.append("<number>")
        return out


def feature_evidence(schema: dict | None) -> FeatureEvidence | None:
    """The evidence finder of an expert's public schema, or None when the schema is missing or unusable
    (then no evidence is required: the other signals decide)."""
    if not schema:
        return None
    try:
        return FeatureEvidence(schema)
    except (ValueError, KeyError, TypeError):
        return None
