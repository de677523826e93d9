"""One generating row of the torch engine: its request, modifiers, tokens and text, and how it
advances by one token (sampling, stop tokens and strings, length, streaming). Engine-thread only."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from causal_lm import chat_ids
from serve_app.replica.detok import Detokenizer
from serve_app.replica.modifiers import RowModifier
from serve_app.wire import GenerationEvent, GenerationRequest, Prediction, ReplicaError


def encode_prompt(tokenizer, request: GenerationRequest) -> list[int]:
    """Default prompt ids: the chat template with generation prompt, or the raw completion prompt."""
    if request.messages is not None:
        return chat_ids(tokenizer, request.messages)
    return [int(i) for i in tokenizer(request.prompt or "", add_special_tokens=False)["input_ids"]]


def put_all(items: list) -> None:
    """Deliver (queue, event) pairs on their event loop (scheduled there by the engine thread)."""
    for q, event in items:
        q.put_nowait(event)


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from ``logits`` (V,) at ``temperature`` (> 0) with nucleus ``top_p``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(eq=False)
class Row:
    req: GenerationRequest
    modifiers: tuple[RowModifier, ...]
    prompt_ids: list[int]
    num_slots: int
    detok: Detokenizer
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tenant: str
    outbox: dict
    """The engine's events of the current step, by event loop (one wake-up per loop per step)."""
    slot: int = -1
    cached: int = 0
    generated: int = 0
    last_token: int = -1
    generator: torch.Generator | None = None
    prediction: Prediction | None = None
    done: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def prefill_len(self) -> int:
        return len(self.prompt_ids) + self.num_slots

    def push(self, event: GenerationEvent) -> None:
        """Queue ``event`` for the row's consumer; delivered with the rest of the step's events."""
        self.outbox.setdefault(self.loop, []).append((self.queue, event))

    def fail(self, status: int, message: str) -> None:
        if not self.done:
            self.done = True
            self.push(GenerationEvent(error=ReplicaError(status=status, message=message)))


    def advance(self, token: int, stop_ids: set[int]) -> bool:
        """Append one generated token; queue its text; True once the row finished (final event queued)."""
        finish = None
        if token in stop_ids and not self.req.ignore_eos:
            finish, delta = "stop", self.detok.flush()
        else:
            self.generated += 1
            self.last_token = token
            delta, stopped = self.detok.push(token)
            if stopped:
                finish = "stop"
            elif self.generated >= self.req.max_tokens:
                finish, delta = "length", delta + self.detok.flush()
        if finish is None:
            if delta:
                self.push(GenerationEvent(text=delta))
            return False
        self.done = True
        self.push(GenerationEvent(text=delta, finish_reason=finish, prompt_tokens=len(self.prompt_ids),
                                  completion_tokens=self.generated, prediction=self.prediction))
        return True


def next_tokens(logits: torch.Tensor, rows: list[Row], first: bool = False) -> list[int]:
    """Next token per row: forced by a modifier (first token only), greedy, or sampled with the row's
    temperature / top-p / seed."""
    out = logits.argmax(-1).tolist()
    for i, row in enumerate(rows):
        if first:
            forced = next((f for m in row.modifiers if (f := m.first_token(logits[i])) is not None), None)
            if forced is not None:
                out[i], row.prediction = forced.token, forced.prediction
                continue
        if row.req.temperature > 0:
            out[i] = sample_token(logits[i], row.req.temperature, row.req.top_p, row.generator)
    return out
