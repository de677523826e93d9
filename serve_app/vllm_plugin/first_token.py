"""A vLLM logits processor: an expert request's first token is its best class answer token.

The Llamdex answer is read at the last slot: the class answer token with the highest logit,
whatever the request's sampling settings (as the torch engine does). A request opts in with
``SamplingParams(extra_args={"atelier_class_tokens": [ids...]})``; at its first sampled position
every other token gets -inf and the best class token 0, so any sampler picks it. Later positions
are untouched. The class probabilities are read from vLLM's raw logprobs of those token ids
(``logprob_token_ids``), which are computed before logits processors run.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

EXTRA_ARG = "atelier_class_tokens"


class ClassAnswerFirst(LogitsProcessor):
    """Force the argmax class token at the first generated position of opted-in requests."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, tuple[torch.Tensor, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        ids = (sampling_params.extra_args or {}).get(EXTRA_ARG)
        if ids is not None and (not isinstance(ids, list) or len(ids) < 2
                                or not all(isinstance(i, int) and i >= 0 for i in ids)):
            raise ValueError(f"extra_args.{EXTRA_ARG} must list at least two token ids, got {ids!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            ids = (params.extra_args or {}).get(EXTRA_ARG) if params is not None else None
            if ids:
                self.rows[index] = (torch.tensor(ids, dtype=torch.long, device=self.device), output)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (ids, output) in self.rows.items():
            if output:  # only the first generated token is forced
                continue
            best = ids[logits[index, ids].argmax()]
            logits[index] = float("-inf")
            logits[index, best] = 0.0
        return logits
