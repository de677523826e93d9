"""What ``model="auto"`` compares a prompt with: a customization's *documents*.

A :class:`Profile` is the list of short texts that say what one customization is for. Short,
separate documents embed better than one long concatenation (a sentence embedder averages a
long text into something about nothing in particular), and the best-matching one wins:

* an adapter: its upload ``description`` and the example prompts the tenant uploaded with it
  (``metadata.examples``, see :func:`check_examples`);
* an expert: the sentences of its description (the schema's, as the experts job publishes it),
  the target question, the target question with each class description ("Did the passenger
  survive the sinking? died in the sinking"), the feature descriptions as one list, and a few
  questions composed from the schema alone by Llamdex's question generator
  (:class:`llamdex.questions.QuestionGenerator`, the same code that makes connector training
  questions) — no tenant data is used; and what tells whether a prompt states any of its feature
  values (:mod:`~serve_app.ingress.routing.evidence`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.ingress.routing.evidence import FeatureEvidence

MAX_EXAMPLES = 50
MAX_EXAMPLE_CHARS = 2000
SCHEMA_QUESTIONS = 8
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_ITEM = re.compile(r"(?:,|;|\band\b)(?![^(]*\))")  # list separators outside parentheses


@dataclass(frozen=True)
class Profile:
    """One customization as the recommender sees it."""

    model_id: str
    kind: str  # "adapter" | "expert"
    documents: tuple[str, ...]
    sources: tuple[str, ...] = field(default=())  # what each document is (for explanations)
    # experts: which feature values a prompt states (serve_app.ingress.routing.evidence); None = not checked
    evidence: FeatureEvidence | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not self.sources:
            object.__setattr__(self, "sources", ("document",) * len(self.documents))


def check_examples(value) -> list[str]:
    """Validate an adapter's uploaded example prompts (``metadata.examples``): a list of at most
    50 non-empty strings of at most 2000 characters. Raises ValueError naming the fix."""
    if value is None:
        return []
    if isinstance(value, str):
        raise ValueError("metadata.examples must be a JSON list of prompt strings, not one string; "
                         "fix: send [\"first prompt\", \"second prompt\"]")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("metadata.examples must be a list of strings (example user prompts)")
    cleaned = [v.strip() for v in value if v.strip()]
    if len(cleaned) > MAX_EXAMPLES:
        raise ValueError(f"metadata.examples: {len(cleaned)} prompts, at most {MAX_EXAMPLES} are kept; "
                         "fix: send the most typical ones")
    too_long = [i for i, v in enumerate(cleaned) if len(v) > MAX_EXAMPLE_CHARS]
    if too_long:
        raise ValueError(f"metadata.examples[{too_long[0]}] is longer than {MAX_EXAMPLE_CHARS} characters; "
                         "fix: shorten it")
    return cleaned


def description_fragments(text: str) -> list[str]:
    """A description and its parts: sentences, and the items of an enumeration after a colon,
    each prefixed with what comes before the colon ("Cooking assistant: ingredient substitutions").
    A sentence embedding of a long list is an average of everything in it; its items alone match
    a prompt about one of them much better."""
    out = []
    for sentence in _SENTENCE.split(text.strip()):
        sentence = sentence.strip()
        if len(sentence) < 4:
            continue
        out.append(sentence)
        head, colon, rest = sentence.partition(":")
        if not colon:
            continue
        items = [i.strip(" .") for i in _ITEM.split(rest) if len(i.strip(" .")) > 3]
        if len(items) > 1:
            out += [f"{head.strip()}: {i}" for i in items]
    return list(dict.fromkeys(out))


def adapter_profile(model_id: str, description: str, examples: list[str] | tuple[str, ...] = (),
                    fragments: bool = True) -> Profile:
    """Description (and its fragments) + uploaded example prompts."""
    docs, sources = [], []
    parts = description_fragments(description) if fragments else [description.strip()] if description.strip() else []
    for d in parts:
        docs.append(d)
        sources.append("description")
    for e in examples:
        docs.append(e)
        sources.append("example")
    return Profile(model_id, "adapter", tuple(docs), tuple(sources))


def expert_profile(model_id: str, description: str, schema: dict | None,
                   schema_questions: int = SCHEMA_QUESTIONS, fragments: bool = True) -> Profile:
    """Description sentences, target question (+ each class), feature list, schema-made questions."""
    docs: list[tuple[str, str]] = []
    for text in (description, (schema or {}).get("description", "")):
        if fragments:
            docs += [(d, "description") for d in description_fragments(text or "")]
        else:
            docs += [(s.strip(), "description") for s in _SENTENCE.split(text or "") if len(s.strip()) > 3]
    if schema:
        target = schema.get("target", {})
        question = str(target.get("question", "")).strip()
        if question:
            docs.append((question, "target question"))
            for c in target.get("classes", []):
                what = str(c.get("description") or c.get("name") or "").strip()
                if what:
                    docs.append((f"{question} {what}", "class"))
        features = [str(f.get("description") or f.get("name", "")).replace("_", " ") for f in schema.get("features", [])]
        if features:
            docs.append(("; ".join(f for f in features if f), "features"))
        docs += [(q, "schema question") for q in schema_made_questions(schema, schema_questions)]
    unique = list(dict.fromkeys(docs))
    from serve_app.ingress.routing.evidence import feature_evidence

    return Profile(model_id, "expert", tuple(d for d, _ in unique), tuple(s for _, s in unique),
                   feature_evidence(schema))


def schema_made_questions(schema: dict, n: int, seed: int = 0) -> list[str]:
    """``n`` questions about synthetic rows, composed from the public schema alone (held-out
    phrasing family, so they differ from the connectors' training questions)."""
    if n <= 0:
        return []
    try:
        from llamdex.questions import QuestionGenerator
        from llamdex.synthetic import make_synthetic

        rows, _ = make_synthetic(schema, n_rows=max(n, 8), seed=seed)
        return QuestionGenerator(schema, seed=seed).make_many(rows.head(n), family="heldout")
    except (ValueError, KeyError, TypeError):  # a schema the generator cannot use: the other documents remain
        return []
