"""A customization's *topic questions*: what people ask **about** its subject rather than **for** its task.

A sentence embedder scores topic, not intent: "When did the golden age of piracy end?" is as close
to a pirate-voice storyteller as "Write me a pirate story", and "What is the pH of lemon juice?"
is close to a wine-quality expert. The recommender therefore compares a prompt with two sets of
texts per customization: its own documents (what it is for) and questions about its subject that
it is *not* for, written here from the customization's own words. A prompt much nearer to the
latter than to any of the former goes to ``base`` (the margin is chosen on the routing
benchmark's validation split, bench/routing.py).

The subject's words are the ones of its description (and example prompts) that the embedder finds
most typical of the customization and least typical of everyday requests; the questions are fixed
information-seeking templates, part of the method like
:data:`~serve_app.ingress.routing.background.GENERAL_REQUESTS` (a test checks they share no prompt
with the benchmark).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from serve_app.ingress.routing.profiles import Profile

TOPIC_TEMPLATES: tuple[str, ...] = (
    "What is {t}?", "Tell me about the history of {t}.", "Who invented {t}?", "Give me some fun facts about {t}.",
    "Explain what {t} means.", "How does {t} work?", "Where does {t} come from?", "Why is {t} important?",
    "What are the pros and cons of {t}?", "Define {t} in one sentence.", "When was {t} first used?",
    "Recommend a good book about {t}.", "Is {t} popular in Europe?", "What is the origin of the word {t}?",
)
TERMS = 4  # subject words per customization
SOURCES = ("description", "target question", "example")  # which documents the words come from
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_CLAUSE = re.compile(r"[,;:.!?()\[\]\"/]+")  # a two-word phrase does not cross these


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def candidate_terms(texts: Sequence[str]) -> list[str]:
    """Lower-cased words and two-word phrases (within a clause) of ``texts`` without stop words or words
    under 3 letters."""
    stop, out = _stop_words(), set()
    for clause in (c for text in texts for c in _CLAUSE.split(text)):
        words = [w.strip("'-") for w in _WORD.findall(clause)]
        for n in (1, 2):
            for i in range(len(words) - n + 1):
                gram = words[i:i + n]
                if all(len(w) >= 3 and w.lower() not in stop for w in gram):
                    out.add(" ".join(gram).lower())
    return sorted(out)


def topic_terms(profile: Profile, encode: Callable[[list[str]], np.ndarray], general_centroid: np.ndarray,
                k: int = TERMS) -> list[str]:
    """The ``k`` candidate terms nearest the profile's documents and farthest from everyday requests
    (``general_centroid``: the mean embedding of the general requests)."""
    texts = [d for d, s in zip(profile.documents, profile.sources, strict=True) if s in SOURCES]
    terms = candidate_terms(texts)
    if not terms or not profile.documents:
        return []
    vectors = encode(terms)
    centre = encode(list(profile.documents)).mean(0)
    typical = vectors @ centre - vectors @ general_centroid
    return [terms[i] for i in np.argsort(-typical)[:k]]


def topic_questions(terms: Sequence[str]) -> list[str]:
    """Every template filled with every term."""
    return [t.format(t=term) for term in terms for t in TOPIC_TEMPLATES]
