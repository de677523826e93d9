"""Typed payloads between the router and the pool replicas (and out of the engines).

Every hop is a pydantic model: the router sends a :class:`GenerationRequest` or a
:class:`PredictCall`; a replica answers with :class:`GenerationEvent` items (streaming), one
:class:`GenerationResult`, a :class:`PredictReply`, :class:`BankStatus` or :class:`ReplicaStats`.
An answer's structured parts (an expert's prediction, an error) are fields, never dict keys.
Ray pickles these objects as they are; both ends import this module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """A request an engine (or the replica) refuses or cannot serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationRequest(_Wire):
    """What the router sends to a replica (already authorised and resolved)."""

    request_id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    """Keep generating past end-of-turn tokens until ``max_tokens`` (benchmarks: fixed output lengths)."""
    adapter: str | None = None
    """Bank adapter id (``tenant/name``) or None for the base model."""
    expert: str | None = None
    """Expert key ``<tenant>/<name>@e<expert version>.c<connectors version>`` (``serve_app.replica.expert_runtime.ExpertKey``;
    the router pins both versions) or None. In ``serve_app`` an ``expert`` field is always such a key;
    a loaded expert is a bundle (``llamdex.insertion.Bundle``, held by ``LoadedExpert``)."""
    tenant: str = "-"
    """Who asked: the engine fills its batches fairly across tenants."""
    model: str = "base"


class ReplicaError(_Wire):
    """A refused or failed request: the HTTP status the router answers with, and why."""

    status: int = 500
    message: str


class Prediction(_Wire):
    """A Llamdex expert's answer read at the last slot (the first generated token is its answer)."""

    expert: str
    """The expert key that answered (see :attr:`GenerationRequest.expert`)."""
    label: str
    answer: str
    probabilities: dict[str, float]


class _Generated(_Wire):
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prediction: Prediction | None = None
    error: ReplicaError | None = None


class GenerationEvent(_Generated):
    """One streamed piece of a generation; the last one has ``finish_reason`` (and usage) or ``error``."""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class GenerationResult(_Generated):
    """A whole (non-streamed) generation, or the error that stopped it."""

    @classmethod
    def collect(cls, events: list[GenerationEvent]) -> GenerationResult:
        """Join a stream's events: all text, the last event's finish, usage, prediction and error."""
        last = events[-1] if events else GenerationEvent(error=ReplicaError(message="empty stream"))
        return cls(**{**last.model_dump(exclude={"text"}), "text": "".join(e.text for e in events)})


class PredictCall(_Wire):
    """One expert prediction, as the router sends it to a replica."""

    expert: str
    """Expert key ``<tenant>/<name>@e<expert version>.c<connectors version>``."""
    question: str


class PredictResult(_Wire):
    """The expert's answer to one question, with what the encoder read and the versions used."""

    label: str
    probabilities: dict[str, float]
    features: dict[str, Any]
    stated: list[str] = []
    not_stated: list[str] = []
    read_by_meaning: dict[str, dict[str, Any]] = {}
    """Stated categories read from the user's own words by the meaning reader (value, clause, similarity)."""
    expert_probabilities: dict[str, float]
    expert_key: str
    expert_version: int
    connectors_version: int
    layer: int
    num_slots: int
    prompt_tokens: int
    batch_rows: int


class PredictReply(_Wire):
    """A prediction or the error that prevented it."""

    result: PredictResult | None = None
    error: ReplicaError | None = None


class BankStatus(_Wire):
    """The bank a replica serves after a reload request (and why a newer one was refused)."""

    bank_version: int | None
    error: str | None = None


class EngineStats(_Wire):
    """Counters of one engine (continuous batching: one decode step = one forward of every running row)."""

    engine: str
    steps: int = 0
    """Decode forwards."""
    batched_steps: int = 0
    """Decode forwards with more than one row."""
    prefill_forwards: int = 0
    rows_served: int = 0
    running: int = 0
    waiting: int = 0
    peak_batch_rows: int = 0


class ReplicaStats(_Wire):
    """What ``LLMReplica.stats`` reports (tests, benches, operators)."""

    pool: str
    model: str
    replica: str
    bank_version: int | None
    adapters: int
    engine: EngineStats
    experts_resident: list[str]
    experts_alive: int
    expert_loads: int
    expert_hits: int
    expert_misses: int
    expert_evictions: int
    expert_last_load_s: float | None
    predict_batches: int
