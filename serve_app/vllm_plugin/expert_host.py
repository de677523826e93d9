"""Engine side of the Llamdex plugin: worker slots for experts, request inputs, predictions.

An :class:`ExpertHost` maps an expert key (``tenant/name@e<v>.c<v>``, which pins both artifact
versions) to a worker slot id (loaded with ``atelier_expert_load``; at most ``max_experts``,
least recently used evicted), numbers requests (the nonce that ties a request to the features
its encoder read), builds the vLLM inputs of an expert request (:meth:`ExpertHost.inputs`) and
turns the first token's class logprobs into the prediction (:func:`prediction`).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from serve_app.vllm_plugin.first_token import EXTRA_ARG
from serve_app.vllm_plugin.llamdex_model import expert_item


@dataclass(frozen=True)
class ExpertInputs:
    """vLLM inputs of one expert request: prompt fields, sampling extras, and its nonce."""

    prompt: dict[str, Any]  # TokensPrompt fields
    sampling: dict[str, Any]  # SamplingParams fields to set
    nonce: int


class ExpertHost:
    """Expert key -> worker slot id (LRU), and per-request inputs."""

    def __init__(self, max_experts: int):
        self.max_experts = max_experts
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._free = list(range(max_experts))[::-1]
        self._busy: dict[int, int] = {}
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()

    def slot(self, key: str) -> tuple[int, bool, list[int]]:
        """(slot id, whether it must be loaded, slot ids to unload first) for expert ``key``."""
        with self._lock:
            if key in self._slots:
                self._slots.move_to_end(key)
                return self._slots[key], False, []
            evicted = []
            while not self._free:
                victim = next((k for k, s in self._slots.items() if not self._busy.get(s)), None)
                if victim is None:
                    raise RuntimeError(f"all {self.max_experts} expert slots are in use by running requests; "
                                       "fix: raise max_experts_per_replica")
                s = self._slots.pop(victim)
                evicted.append(s)
                self._free.append(s)
            s = self._free.pop()
            self._slots[key] = s
            return s, True, evicted

    def forget(self, key: str) -> None:
        """The load of ``key`` failed: give its slot back."""
        with self._lock:
            s = self._slots.pop(key, None)
            if s is not None:
                self._free.append(s)

    def acquire(self, slot_id: int) -> None:
        with self._lock:
            self._busy[slot_id] = self._busy.get(slot_id, 0) + 1

    def release(self, slot_id: int) -> None:
        with self._lock:
            left = self._busy.get(slot_id, 0) - 1
            if left > 0:
                self._busy[slot_id] = left
            else:
                self._busy.pop(slot_id, None)

    def inputs(self, slot_id: int, bundle, prompt_ids: list[int]) -> ExpertInputs:
        """Prompt + slots item + sampling extras of one expert request (the prompt must be the
        connectors' training prompt, e.g. ``llamdex.prompting.chat_prompt_ids``)."""
        nonce = next(self._nonce)
        ids = list(bundle.spec.class_token_ids)
        return ExpertInputs(
            prompt={"prompt_token_ids": list(prompt_ids), "cache_salt": f"atelier-expert-{nonce}",
                    "multi_modal_data": {"image": expert_item(slot_id, bundle.spec.num_slots, nonce)}},
            sampling={"logprob_token_ids": ids, "extra_args": {EXTRA_ARG: ids}},
            nonce=nonce)


def prediction(bundle, first_logprobs: dict[int, Any], read: dict | None = None) -> dict[str, Any]:
    """The fields of ``llamdex.insertion.predict`` from a vLLM expert request.

    Label, answer token and class probabilities come from the first position's logprobs of the
    class tokens (softmax over the class logits = renormalised exp of their logprobs); with ``read``
    (the worker's record, ``atelier_expert_results``) also what the encoder read: ``features``
    (decoded by the codec; None where the question did not state it), ``stated`` / ``not_stated``,
    ``encoded_features`` and ``expert_probabilities`` (the expert on those features)."""
    import torch

    from llamdex.expert import predict_proba

    spec = bundle.spec
    scores = []
    for tid in spec.class_token_ids:
        lp = first_logprobs.get(tid)
        if lp is None:
            raise RuntimeError(f"vLLM returned no logprob for class token {tid}")
        scores.append(float(getattr(lp, "logprob", lp)))
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    best = max(range(len(scores)), key=scores.__getitem__)
    out: dict[str, Any] = {"label": spec.class_names[best], "answer": spec.class_token_strings[best],
                           "probabilities": dict(zip(spec.class_names, (w / total for w in weights), strict=True))}
    if read is not None:
        feats = torch.tensor([read["encoded_features"]], dtype=torch.float32)
        decoded = bundle.codec.decode(feats.numpy())[0]
        said = {f.name: bool(s) for f, s in zip(bundle.encoder.cfg.features, read["stated"], strict=True)}
        out.update(features={k: (v if said[k] else None) for k, v in decoded.items()},
                   stated=[k for k in decoded if said[k]], not_stated=[k for k in decoded if not said[k]],
                   encoded_features=read["encoded_features"],
                   expert_probabilities=dict(zip(spec.class_names, predict_proba(bundle.expert, feats)[0].tolist(),
                                                 strict=True)))
    return out
