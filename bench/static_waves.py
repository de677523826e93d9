"""BASELINE ONLY: the torch engine as it was before continuous batching ("static waves").

Kept so ``bench/serving.py`` can measure today's engine against the continuous one in the same
run. The algorithm is that engine's (then ``serve_app/engine.py``), unchanged: an asyncio loop collects up to
``max_batch_size`` requests within ``batch_wait_ms`` into a *wave*; one thread runs the wave
(left-padded prefill, then decode steps until its longest row ends — a request arriving meanwhile
waits for the whole wave, finished rows keep being fed, and every step re-decodes each row's
whole text). Only the interface is new (the Engine protocol, ``AdapterModifier`` rows, typed
events); experts are not supported here. Not used by the service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from causal_lm import left_pad, stop_token_ids
from serve_app.replica.engine_api import EngineCapabilities, check_supported
from serve_app.replica.modifiers import ADAPTER, RowModifier
from serve_app.replica.rows import encode_prompt, sample_token
from serve_app.wire import EngineStats, GenerationEvent, GenerationRequest, ReplicaError


@dataclass
class _Row:
    req: GenerationRequest
    adapter: str | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False
    generator: torch.Generator | None = None

    def push(self, event: GenerationEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class StaticWaveEngine:
    """The pre-continuous-batching torch engine (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 max_prompt_tokens: int = 2048, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_ms / 1000
        self.max_prompt_tokens = max_prompt_tokens
        self.capabilities = EngineCapabilities(name="torch-static-waves", modifiers=frozenset({ADAPTER}),
                                               continuous_batching=False, max_batch_rows=max_batch_size)
        self.bank_handle = None
        self.bank_version: int | None = None
        self._pending: asyncio.Queue[_Row] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop_task: asyncio.Task | None = None
        self.stop_ids = stop_token_ids(tokenizer)
        self._stats = EngineStats(engine="torch-static-waves")

    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        return self._executor.submit(fn)

    def set_bank(self, bank, version: int | None) -> None:
        from compression import attach_bank

        if self.bank_handle is not None:
            self.bank_handle.detach()
            self.bank_handle = None
        if bank is not None:
            self.bank_handle = attach_bank(self.model, bank)
        self.bank_version = version

    async def swap_bank(self, bank, version: int | None) -> None:
        await asyncio.wrap_future(self.run_between_steps(lambda: self.set_bank(bank, version)))

    def adapter_names(self) -> list[str]:
        return list(self.bank_handle.bank.adapters) if self.bank_handle else []

    def stats(self) -> EngineStats:
        return self._stats.model_copy()

    @property
    def alive(self) -> bool:
        return self._loop_task is None or not self._loop_task.done()

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False)

    async def generate(self, request: GenerationRequest,
                       modifiers: Sequence[RowModifier] = ()) -> AsyncIterator[GenerationEvent]:
        check_supported(self.capabilities, modifiers)
        adapter = next((m.name for m in modifiers), None)  # type: ignore[attr-defined]
        if self._pending is None:
            self._pending = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._wave_loop())
        row = _Row(req=request, adapter=adapter, queue=asyncio.Queue(), loop=asyncio.get_running_loop())
        await self._pending.put(row)
        while True:
            event = await row.queue.get()
            yield event
            if event.final:
                return

    async def _wave_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rows = [await self._pending.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(rows) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    rows.append(await asyncio.wait_for(self._pending.get(), timeout))
                except asyncio.TimeoutError:
                    break
            await loop.run_in_executor(self._executor, self._run_wave_safely, rows)
            del rows

    def _run_wave_safely(self, rows: list[_Row]) -> None:
        try:
            self._run_wave(rows)
        except Exception as exc:
            for row in rows:
                if not row.done:
                    row.push(GenerationEvent(error=ReplicaError(message=f"internal error: {exc!r}")))

    def _run_wave(self, rows: list[_Row]) -> None:
        live = []
        for row in rows:
            row.prompt_ids = encode_prompt(self.tokenizer, row.req)
            if row.req.seed is not None:
                row.generator = torch.Generator().manual_seed(row.req.seed)
            live.append(row)
        self._stats.steps += 1
        self._stats.rows_served += len(live)
        pad = self.tokenizer.pad_token_id
        input_ids, attention, positions = left_pad([r.prompt_ids for r in live], pad)
        with torch.inference_mode(), self._adapter_context([r.adapter for r in live]):
            out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
            logits, cache = out.logits[:, -1, :], out.past_key_values
            max_new = max(r.req.max_tokens for r in live)
            for _ in range(max_new):
                next_ids = self._sample(logits, live)
                for i, row in enumerate(live):
                    if not row.done:
                        self._advance(row, int(next_ids[i]))
                if all(r.done for r in live):
                    break
                attention = torch.cat([attention, torch.ones(len(live), 1, dtype=attention.dtype)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
                logits, cache = out.logits[:, -1, :], out.past_key_values

    def _adapter_context(self, adapters: list[str | None]):
        """Per-row bank adapters for one wave."""
        return self.bank_handle.using(adapters) if self.bank_handle else nullcontext()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        logits = logits.float()
        out = torch.empty(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            t = row.req.temperature
            out[i] = int(logits[i].argmax()) if t == 0 else sample_token(logits[i], t, row.req.top_p, row.generator)
        return out

    def _advance(self, row: _Row, token: int) -> None:
        finish = None
        if token in self.stop_ids and not row.req.ignore_eos:
            finish = "stop"
        else:
            row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        for s in row.req.stop:
            cut = text.find(s)
            if cut != -1:
                text, finish = text[:cut], "stop"
        if finish is None and len(row.generated) >= row.req.max_tokens:
            finish = "length"
        holdback = 0 if finish else max([len(s) - 1 for s in row.req.stop] + [0])
        if not finish and text.endswith("\ufffd"):
            holdback = max(holdback, 1)
        ready = len(text) - holdback
        delta = text[row.emitted:ready] if ready > row.emitted else ""
        row.emitted = max(row.emitted, ready)
        if finish:
            row.done = True
            row.push(GenerationEvent(text=delta, finish_reason=finish, prompt_tokens=len(row.prompt_ids),
                                     completion_tokens=len(row.generated)))
        elif delta:
            row.push(GenerationEvent(text=delta))
