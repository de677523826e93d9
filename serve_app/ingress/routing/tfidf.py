"""The measured baseline: TF-IDF cosine between the prompt and each customization's text.

This is what ``model="auto"`` did before the semantic recommender: one text per customization
(its documents joined), scikit-learn's TF-IDF (English stop words, uni- and bigrams, fitted on
the candidates' texts + the prompt), best score at or above ``threshold`` wins. It keeps the
:class:`~serve_app.ingress.routing.recommender.Recommender` interface so the benchmark and the router
can swap one for the other (``routing.method: tfidf``); feedback is not used by it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from serve_app.ingress.routing.profiles import Profile
from serve_app.ingress.routing.recommender import BASE, MemoryItem, Recommendation, Scores


def similarity_scores(prompt: str, documents: list[str]) -> list[float]:
    """TF-IDF cosine similarity of ``prompt`` to each document (0 when there are none)."""
    if not documents:
        return []
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, ngram_range=(1, 2))
    try:
        matrix = vec.fit_transform(documents + [prompt])
    except ValueError:  # empty vocabulary (e.g. only stop words)
        return [0.0] * len(documents)
    return cosine_similarity(matrix[-1], matrix[:-1])[0].tolist()


class TfidfRecommender:
    """Word-overlap routing over each profile's joined documents."""

    method = "tfidf-cosine(prompt, description)"

    def __init__(self, threshold: float = 0.12, top: int = 5):
        self.threshold, self.top = threshold, top

    def warm(self, profiles: Sequence[Profile]) -> None:
        """Nothing to precompute (the vectorizer is fitted per request)."""

    def scores(self, prompt: str, profiles: Sequence[Profile]) -> Scores:
        """Rank and gate are both the TF-IDF cosine; no checks."""
        texts = [" ".join(p.documents) for p in profiles]
        s = np.asarray(similarity_scores(prompt, texts), dtype=np.float32)
        n = len(profiles)
        return Scores(s, s, [-1] * n, s, np.full(n, np.inf, dtype=np.float32), [None] * n)

    def recommend(self, prompt: str, profiles: Sequence[Profile], memory: Sequence[MemoryItem] = ()) -> Recommendation:
        started = time.perf_counter()
        profiles = [p for p in profiles if p.documents]
        scores = self.scores(prompt, profiles).rank
        order = np.argsort(-scores) if len(scores) else []
        table = [{"model": profiles[i].model_id, "kind": profiles[i].kind, "similarity": round(float(scores[i]), 4)}
                 for i in order[: self.top]]
        rec = Recommendation(BASE, None, self.threshold, self.method, "", table)
        if len(scores) and scores[order[0]] >= self.threshold:
            rec.chosen, rec.score = profiles[order[0]].model_id, float(scores[order[0]])
            rec.why = "the most similar customization reached the threshold"
        else:
            rec.score = float(scores[order[0]]) if len(scores) else None
            rec.why = ("no customization reached the similarity threshold" if len(scores) else
                       "the caller has no servable customization")
        rec.elapsed_ms = (time.perf_counter() - started) * 1000
        return rec
