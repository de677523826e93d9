"""The one contract every engine implements (torch, vLLM; the benchmark's peers too).

An engine turns a typed :class:`serve_app.wire.GenerationRequest` plus the row's
:class:`serve_app.replica.modifiers.RowModifier` objects into an async stream of typed
:class:`serve_app.wire.GenerationEvent` items, swaps the adapter bank without dropping requests,
lists the adapters it can serve and states its :class:`EngineCapabilities`. The replica talks to
engines only through this protocol: it checks capabilities, never engine classes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from serve_app.replica.modifiers import RowModifier
from serve_app.wire import EngineError, EngineStats, GenerationEvent, GenerationRequest


class EngineCapabilities(BaseModel):
    """What an engine can do; the replica and router decide by these, not by engine type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    modifiers: frozenset[str]
    """``RowModifier.kind`` values the engine applies per row (``adapter``, ``expert``)."""
    continuous_batching: bool
    """Requests join and leave the running batch between decode steps."""
    streaming: bool = True
    max_batch_rows: int = 0
    predicts_experts: bool = False
    """The engine answers expert ``predict`` calls itself (``engine.predict``, batched with its other rows);
    otherwise the replica predicts on the engine's torch model (``PredictBatcher``)."""


@runtime_checkable
class Engine(Protocol):
    """Generate, swap the bank, list adapters, state capabilities (see the module docstring)."""

    capabilities: EngineCapabilities
    tokenizer: Any
    bank_version: int | None

    def generate(self, request: GenerationRequest,
                 modifiers: Sequence[RowModifier] = ()) -> AsyncIterator[GenerationEvent]:
        """Queue the request; yield its events; the last one is final (finish_reason or error)."""
        ...

    def set_bank(self, bank: Any, version: int | None) -> None:
        """Attach ``bank`` (a ``compression.Bank`` or None) before serving starts."""
        ...

    async def swap_bank(self, bank: Any, version: int | None) -> None:
        """Replace the bank while serving; returns once requests after it see the new bank."""
        ...

    def adapter_names(self) -> list[str]:
        """Adapters an ``AdapterModifier`` may name."""
        ...

    def run_between_steps(self, fn) -> Any:
        """Run ``fn`` on the engine's own thread between forwards; a concurrent Future of its result."""
        ...

    def stats(self) -> EngineStats:
        ...

    @property
    def alive(self) -> bool:
        ...

    def shutdown(self) -> None:
        ...


def check_supported(capabilities: EngineCapabilities, modifiers: Sequence[RowModifier]) -> None:
    """EngineError 400 naming the modifier kind this engine cannot apply."""
    for m in modifiers:
        if m.kind not in capabilities.modifiers:
            what = {"expert": "Llamdex experts", "adapter": "adapters"}.get(m.kind, m.kind)
            raise EngineError(400, f"the {capabilities.name} engine cannot serve {what}; send this model to a pool "
                                   f"whose engine supports it (supported here: {sorted(capabilities.modifiers)})")
