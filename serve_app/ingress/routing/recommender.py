"""The ``model="auto"`` recommender: which customization (or ``base``) fits a prompt.

Each candidate is a :class:`~serve_app.ingress.routing.profiles.Profile` (short documents). The prompt
and the documents are embedded by one :mod:`~serve_app.ingress.routing.embedders` embedder.

1. **Which one.** A candidate's score is the mean (``pooling="mean"``; or ``"max"``) cosine
   similarity between the prompt and its documents; the best score is the candidate.
2. **Whether at all.** Raw cosine means different things for different customizations, so
   with ``normalize=True`` (the default) the best candidate's score is compared with the scores
   the same candidate gets for a fixed set of everyday requests
   (:data:`~serve_app.ingress.routing.background.GENERAL_REQUESTS`): ``z = (score − mean) / std``.
   The candidate wins if ``z ≥ threshold`` (standard deviations); otherwise ``base``.
   ``normalize=False`` compares the raw score with the threshold. Two more checks, each able to
   send the prompt to ``base``: **about, not for** -- the prompt must not be nearer, by more than
   ``topic_margin``, to a question *about* the candidate's subject than to its nearest own document
   (:mod:`~serve_app.ingress.routing.topics`); **something to read** -- an expert is chosen only if
   the prompt states a value of at least ``min_values`` of its features (``require_evidence``,
   :mod:`~serve_app.ingress.routing.evidence`).
   A long prompt (``views_min_words`` words or more: a pasted contract, a diff, an email with the
   request around it) is also scored by its first and its last sentence, where people write what they
   want; the view whose best candidate scores highest decides (``Scores.view``).
3. **What the tenant taught it** (:class:`MemoryItem`, from ``POST /v1/feedback``), nearest
   neighbour: the nearest prompt the tenant confirmed or corrected decides (its label: a
   servable customization or ``base``) if it is at least ``memory_similarity`` alike *and*
   closer, by ``memory_margin``, than the nearest document of the customization the documents
   would choose; a thumbs-down on "prompt → c" vetoes c under the same two conditions. The
   second condition keeps a correction from spreading to prompts that say what c is for
   ("history of pirate ships → base" must not capture "write a pirate story").

Every number that decided is in the returned :class:`Recommendation`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serve_app.ingress.routing.background import GENERAL_REQUESTS
from serve_app.ingress.routing.embedders import CachedEmbedder, Embedder
from serve_app.ingress.routing.profiles import Profile
from serve_app.ingress.routing.topics import topic_questions, topic_terms

BASE = "base"
POOLINGS = ("mean", "max")
# chosen with the z threshold on the routing benchmark's validation split (bench/routing.py)
TOPIC_MARGIN = -0.22
MIN_VALUES = 2  # features an expert needs stated (validated for minilm; minilm-intent: DEFAULT_MIN_VALUES in __init__)
VIEWS_MIN_WORDS = 25  # prompts this long are also scored by their first and last sentence
_SEGMENT = re.compile(r"(?<=[.!?:])\s+|\n+")


@dataclass(frozen=True)
class MemoryItem:
    """One piece of tenant feedback: ``prompt`` belongs (vote +1) or does not belong (-1) to ``label``."""

    prompt: str
    label: str  # a model id or "base"
    vote: int = 1


@dataclass
class Recommendation:
    chosen: str  # a model id or "base"
    score: float | None  # the deciding number: z (normalised) or cosine
    threshold: float
    method: str
    why: str
    candidates: list[dict] = field(default_factory=list)  # top scores, best first
    matched: dict | None = None  # the document or feedback prompt that decided
    vetoed: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)  # the about-not-for and evidence checks of the best candidate
    elapsed_ms: float = 0.0

    def explain(self) -> dict:
        """The JSON the response's ``atelier.routing`` carries."""
        out = {"auto": True, "chosen": self.chosen, "method": self.method, "why": self.why,
               "score": None if self.score is None else round(self.score, 4), "threshold": self.threshold,
               "candidates": self.candidates, "recommend_ms": round(self.elapsed_ms, 2)}
        if self.matched:
            out["matched"] = self.matched
        if self.vetoed:
            out["vetoed_by_feedback"] = self.vetoed
        if self.checks:
            out["checks"] = self.checks
        return out


@dataclass
class Scores:
    """Per profile, for one prompt: what ranks, what gates, and the two checks' inputs."""

    rank: np.ndarray  # pooled cosine to the documents
    gate: np.ndarray  # z-score (normalize) or the cosine
    best: list[int]  # index of each profile's most similar document (-1: none)
    nearest: np.ndarray  # best single-document cosine
    topic: np.ndarray  # nearest document minus nearest question about the subject (+inf: not checked)
    stated: list[list[str] | None]  # the best-ranked expert's feature values the prompt states (None: not checked)
    min_values: int = 1  # how many stated values an expert needs
    view: str = "prompt"  # which text of the prompt these scores are for ("prompt", "first sentence", "last sentence")

    def refusal(self, i: int, threshold: float, topic_margin: float | None) -> str | None:
        """Why profile ``i`` may not be chosen -- ``"threshold"``, ``"about"`` (asks about its subject)
        or ``"evidence"`` (states none of an expert's values) -- or None when it may."""
        if not self.gate[i] >= threshold:
            return "threshold"
        if topic_margin is not None and self.topic[i] < topic_margin:
            return "about"
        if self.stated[i] is not None and len(self.stated[i]) < self.min_values:
            return "evidence"
        return None

    def passes(self, i: int, threshold: float, topic_margin: float | None) -> bool:
        """Whether profile ``i`` clears the gate and both checks."""
        return self.refusal(i, threshold, topic_margin) is None


class Recommender:
    """Scores prompts against profiles with one embedder; thread-safe."""

    def __init__(self, embedder: Embedder, threshold: float, pooling: str = "mean", normalize: bool = True,
                 memory_similarity: float = 0.75, memory_margin: float = 0.05, top: int = 5,
                 topic_margin: float | None = TOPIC_MARGIN, require_evidence: bool = True,
                 min_values: int = MIN_VALUES, views_min_words: int | None = VIEWS_MIN_WORDS):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.embedder = embedder if isinstance(embedder, CachedEmbedder) else CachedEmbedder(embedder)
        self.threshold, self.pooling, self.normalize = threshold, pooling, normalize
        self.memory_similarity, self.memory_margin, self.top = memory_similarity, memory_margin, top
        self.topic_margin, self.require_evidence = topic_margin, require_evidence
        self.min_values, self.views_min_words = min_values, views_min_words
        self._stats: dict[tuple[str, ...], tuple[float, float]] = {}
        self._topics: dict[tuple[str, ...], tuple[list[str], np.ndarray]] = {}
        self._lock = threading.Lock()

    @property
    def method(self) -> str:
        gate = "z-score vs general requests" if self.normalize else "cosine"
        checks = (["about-not-for"] if self.topic_margin is not None else []) + (
            [f"expert evidence (≥ {self.min_values})"] if self.require_evidence else []) + (
            [f"first/last sentence of prompts ≥ {self.views_min_words} words"] if self.views_min_words else [])
        return f"{self.embedder.name}: {self.pooling} cosine over documents, {gate}" + (
            f", {' + '.join(checks)}" if checks else "")

    def warm(self, profiles: Sequence[Profile]) -> None:
        """Embed the profiles' documents (and their background statistics) now instead of on first use."""
        for p in profiles:
            if p.documents:
                self.embedder.encode(list(p.documents))
                if self.normalize:
                    self._background(p)
                if self.topic_margin is not None:
                    self._topic_questions(p)

    def _pool(self, sims: np.ndarray) -> np.ndarray:
        return sims.mean(0) if self.pooling == "mean" else sims.max(0)

    def _background(self, p: Profile) -> tuple[float, float]:
        """Mean and std of the profile's score over the general requests (cached per document set)."""
        with self._lock:
            hit = self._stats.get(p.documents)
        if hit is None:
            b = self._pool(self.embedder.encode(list(p.documents)) @ self.embedder.encode(list(GENERAL_REQUESTS)).T)
            hit = (float(b.mean()), float(max(b.std(), 1e-3)))
            with self._lock:
                if len(self._stats) > 10_000:
                    self._stats.clear()
                self._stats[p.documents] = hit
        return hit

    def topic_questions(self, p: Profile) -> list[str]:
        """The questions about ``p``'s subject that the about-not-for check compares prompts with."""
        return topic_questions(self._topic_questions(p)[0])

    def _topic_questions(self, p: Profile) -> tuple[list[str], np.ndarray]:
        """(subject terms, embedded questions about them) of a profile, cached per document set."""
        with self._lock:
            hit = self._topics.get(p.documents)
        if hit is None:
            general = self.embedder.encode(list(GENERAL_REQUESTS)).mean(0)
            terms = topic_terms(p, self.embedder.encode, general)
            questions = topic_questions(terms)
            hit = (terms, self.embedder.encode(questions) if questions else np.zeros((0, 1), dtype=np.float32))
            with self._lock:
                if len(self._topics) > 10_000:
                    self._topics.clear()
                self._topics[p.documents] = hit
        return hit

    def embed_prompt(self, prompt: str) -> np.ndarray:
        """The prompt's vector, computed afresh (prompts are not cached: they rarely repeat, and
        the router should not keep users' prompts around)."""
        return self.embedder.inner.encode([prompt])[0]

    def scores(self, prompt: str, profiles: Sequence[Profile]) -> Scores:
        """Every profile's scores and checks for ``prompt``."""
        return self._scores(prompt, self.embed_prompt(prompt), profiles)

    def views(self, prompt: str) -> list[tuple[str, str]]:
        """(name, text) of a long prompt's first and last sentence or line (three words or more), else []."""
        if not self.views_min_words or len(prompt.split()) < self.views_min_words:
            return []
        parts = [p.strip() for p in _SEGMENT.split(prompt) if len(p.strip().split()) >= 3]
        if not parts:
            return []
        named = [("first sentence", parts[0])] + ([("last sentence", parts[-1])] if len(parts) > 1 else [])
        return [(n, t) for n, t in named if t != prompt.strip()]

    def _scores(self, prompt: str, q: np.ndarray, profiles: Sequence[Profile]) -> Scores:
        """The whole prompt's scores, or a view's whose best candidate scores higher; evidence is read
        from the whole prompt."""
        out = self._score_text(q, profiles)
        for name, text in self.views(prompt):
            view = self._score_text(self.embed_prompt(text), profiles, name)
            if len(profiles) and view.gate.max() > out.gate.max():
                out = view
        if profiles:  # only the best-ranked candidate can be chosen by the documents: check it alone
            self._read_values(out, profiles, int(out.rank.argmax()), prompt)
        return out

    def _score_text(self, q: np.ndarray, profiles: Sequence[Profile], view: str = "prompt") -> Scores:
        n = len(profiles)
        out = Scores(np.full(n, -1e9, dtype=np.float32), np.full(n, -1e9, dtype=np.float32), [],
                     np.full(n, -1.0, dtype=np.float32), np.full(n, np.inf, dtype=np.float32), [None] * n,
                     self.min_values, view)
        for i, p in enumerate(profiles):
            if not p.documents:
                out.best.append(-1)
                continue
            sims = self.embedder.encode(list(p.documents)) @ q
            out.best.append(int(sims.argmax()))
            out.nearest[i] = float(sims.max())
            out.rank[i] = float(self._pool(sims[:, None])[0])
            if self.normalize:
                mean, std = self._background(p)
                out.gate[i] = (out.rank[i] - mean) / std
            else:
                out.gate[i] = out.rank[i]
            if self.topic_margin is not None:
                _, questions = self._topic_questions(p)
                if len(questions):
                    out.topic[i] = out.nearest[i] - float((questions @ q).max())
        return out

    def _read_values(self, sc: Scores, profiles: Sequence[Profile], i: int, prompt: str) -> None:
        """Fill ``sc.stated[i]`` when profile ``i`` is an expert whose evidence is required."""
        evidence = profiles[i].evidence
        if self.require_evidence and evidence is not None and profiles[i].documents and sc.stated[i] is None:
            sc.stated[i] = evidence.stated(prompt)

    def recommend(self, prompt: str, profiles: Sequence[Profile], memory: Sequence[MemoryItem] = ()) -> Recommendation:
        """The best candidate for ``prompt`` or ``base``, with the reasons."""
        started = time.perf_counter()
        rec = Recommendation(BASE, None, self.threshold, self.method, "")
        if not profiles:
            rec.why = "the caller has no servable customization"
        else:
            q = self.embed_prompt(prompt)
            sc = self._scores(prompt, q, profiles)
            rank, gate, best_doc, nearest = sc.rank, sc.gate, sc.best, sc.nearest
            ids = [p.model_id for p in profiles]
            order = [int(i) for i in np.argsort(-rank)]
            rec.candidates = [{"model": ids[i], "kind": profiles[i].kind, "similarity": round(float(rank[i]), 4),
                               **({"z": round(float(gate[i]), 2)} if self.normalize else {})}
                              for i in order[: self.top]]
            recalled = self._recall(q, memory, ids) if memory else ([], [])
            # vetoes: a thumbs-down prompt nearer than any of the customization's own documents
            rec.vetoed = sorted({label for label, sim in recalled[1]
                                 if sim >= nearest[ids.index(label)] + self.memory_margin})
            order = [i for i in order if ids[i] not in rec.vetoed]
            if order:  # feedback may have vetoed the best-ranked one
                self._read_values(sc, profiles, order[0], prompt)
            doc_choice = order[0] if order and sc.passes(order[0], self.threshold, self.topic_margin) else None
            refused = self._checks(rec, sc, profiles, order[0]) if order else ""
            bar = nearest[doc_choice] + self.memory_margin if doc_choice is not None else -1.0
            follow = next(((label, item, sim) for label, item, sim in recalled[0] if sim >= bar), None)
            if follow is not None and (doc_choice is None or follow[0] != ids[doc_choice]):
                label, item, sim = follow
                rec.chosen, rec.score = label, sim
                rec.matched = {"feedback_prompt": _clip(item.prompt), "similarity": round(sim, 4)}
                rec.why = f"you confirmed or corrected a prompt this alike (≥ {self.memory_similarity})"
            elif doc_choice is not None:
                p = profiles[doc_choice]
                rec.chosen, rec.score = ids[doc_choice], float(gate[doc_choice])
                j = best_doc[doc_choice]
                rec.matched = {"document": _clip(p.documents[j]), "source": p.sources[j],
                               **({"prompt_view": sc.view} if sc.view != "prompt" else {})}
                rec.why = "the most similar customization reached the threshold"
            else:
                rec.score = float(gate[order[0]]) if order else None
                rec.why = ("every matching customization was vetoed by your feedback" if not order else
                           refused or "no customization reached the similarity threshold")
        rec.elapsed_ms = (time.perf_counter() - started) * 1000
        return rec

    def _checks(self, rec: Recommendation, sc: Scores, profiles: Sequence[Profile], i: int) -> str:
        """Record candidate ``i``'s two checks in ``rec.checks``; the reason a check refused it, or ''
        (also when only the threshold did: the caller says that)."""
        p = profiles[i]
        if self.topic_margin is not None and np.isfinite(sc.topic[i]):
            terms, _ = self._topic_questions(p)
            rec.checks["about_not_for"] = {"margin": round(float(sc.topic[i]), 4), "min": self.topic_margin,
                                           "subject": terms}
        if sc.stated[i] is not None:
            rec.checks["expert_values_stated"] = sc.stated[i]
            rec.checks["expert_values_needed"] = sc.min_values
        why = sc.refusal(i, self.threshold, self.topic_margin)
        if why == "about":
            return (f"the prompt asks about {p.model_id}'s subject rather than for what it does (nearer to a "
                    "question about it than to its own documents)")
        if why == "evidence":
            n = len(sc.stated[i] or [])
            return (f"the prompt states {'none' if n == 0 else f'only {n}'} of the values the expert {p.model_id} "
                    f"reads (it needs {sc.min_values})")
        return ""

    def _recall(self, q: np.ndarray, memory: Sequence[MemoryItem], ids: list[str]):
        """([(label, item, sim)] of positive feedback, nearest first; [(label, sim)] of thumbs-downs),
        keeping only items at least ``memory_similarity`` alike whose label is still servable."""
        sims = self.embedder.encode([m.prompt for m in memory]) @ q
        near = [(float(s), m) for s, m in zip(sims, memory, strict=True) if s >= self.memory_similarity]
        positives = sorted(((m.label, m, s) for s, m in near if m.vote > 0 and (m.label == BASE or m.label in ids)),
                           key=lambda x: -x[2])
        negatives = [(m.label, s) for s, m in near if m.vote < 0 and m.label in ids]
        return positives, negatives


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
