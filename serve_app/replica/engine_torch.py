"""The torch engine: continuous batching where every row may use a different adapter or expert.

One engine thread loops over *steps*. Each step it admits waiting requests into free KV slots
(round-robin across tenants, :class:`serve_app.replica.scheduler.FairQueue`), runs at most one prefill
forward under a token budget (``prefill_chunk_tokens``: long prompts are split over steps), then
one decode forward of every generating row. Rows join between steps and leave the moment they
finish: a finished row costs nothing afterwards, and no request waits for another's completion.
KV lives in per-row slots (:mod:`serve_app.replica.kv_slots`), so a decode step never re-stacks caches.

What changes a row's forward — a bank adapter, a Llamdex expert — comes as typed
:class:`serve_app.replica.modifiers.RowModifier` objects; sampling (temperature, top-p, per-request
seed), stop tokens and stop strings are per row; text is detokenized incrementally and streamed
as typed :class:`serve_app.wire.GenerationEvent` items. Bank swaps and expert predictions run on
the engine thread between steps, so no forward ever sees half a bank.

Why not transformers' ``ContinuousBatchingManager``: see docs/serving.md ("The torch engine").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from causal_lm import stop_token_ids
from cluster.logs import get_logger
from serve_app.replica.detok import Detokenizer
from serve_app.replica.engine_api import EngineCapabilities, check_supported
from serve_app.replica.kv_slots import SlotCache, attention_mask, install_attention
from serve_app.replica.modifiers import (
    ADAPTER,
    EXPERT,
    ForwardBatch,
    RowModifier,
    RowSpan,
    TorchRuntime,
    apply_all,
)
from serve_app.replica.rows import Row, encode_prompt, next_tokens, put_all
from serve_app.replica.scheduler import FairQueue, SlotTable, plan_prefill
from serve_app.wire import EngineError, EngineStats, GenerationEvent, GenerationRequest

log = get_logger("engine")

__all__ = ["EngineError", "GenerationEvent", "GenerationRequest", "TorchEngine", "TorchEngineConfig"]


class TorchEngineConfig(BaseModel):
    """Knobs of the torch engine (from the pool config)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_rows: int = Field(16, ge=1)
    """KV slots = rows generating at once."""
    prefill_chunk_tokens: int = Field(256, ge=16)
    """Prompt positions prefilled per step at most (chunked prefill): bounds how long one step can
    stall the generating rows."""
    max_prompt_tokens: int = Field(2048, ge=1)
    threads: int = Field(1, ge=1)


class TorchEngine:
    """Owns the model on one replica; ``generate`` may be called concurrently from any event loop."""

    def __init__(self, model, tokenizer, config: TorchEngineConfig | None = None,
                 on_step: Callable[[int], None] | None = None):
        self.config = config or TorchEngineConfig()
        torch.set_num_threads(self.config.threads)
        self.model, self.tokenizer = model.eval(), tokenizer
        install_attention(self.model)
        self.runtime = TorchRuntime(self.model, tokenizer)
        self.capabilities = EngineCapabilities(name="torch", modifiers=frozenset({ADAPTER, EXPERT}),
                                               continuous_batching=True, max_batch_rows=self.config.max_batch_rows)
        self.cache = SlotCache.for_model(self.model, self.config.max_batch_rows)
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._on_step = on_step
        self._waiting: FairQueue[Row] = FairQueue()
        self._table: SlotTable[Row] = SlotTable(self.config.max_batch_rows)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._pending_bank: tuple[Any, int | None, concurrent.futures.Future] | None = None
        self._bank_lock = threading.Lock()
        self._stats = EngineStats(engine="torch")
        self._stopped = threading.Event()
        self._warmup()
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control plane
    @property
    def bank_version(self) -> int | None:
        return self.runtime.bank_version

    @property
    def bank_handle(self):
        return self.runtime.bank

    def _warmup(self) -> None:
        """One tiny forward on the constructing thread: with several intra-op threads, a process whose
        first multithreaded op runs on a background thread decoded 10-18x slower (tested)."""
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([[self.pad_id, self.pad_id]]))

    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between forwards (bank swaps, expert predictions)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, future))
        return future

    def set_bank(self, bank, version: int | None) -> None:
        """Attach ``bank`` (a compression.Bank, or None) replacing the current one. Engine thread or
        before serving."""
        from compression import attach_bank

        if self.runtime.bank is not None:
            self.runtime.bank.detach()
            self.runtime.bank = None
        if bank is not None:
            self.runtime.bank = attach_bank(self.model, bank)
        self.runtime.bank_version = version

    async def swap_bank(self, bank, version: int | None) -> None:
        """Swap banks between steps, once no running row uses an adapter: each adapter row runs
        entirely on one bank. Adapter rows arriving meanwhile wait and start on the new bank (and
        are checked against it); base and expert rows keep flowing."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._bank_lock:  # visible at once to generate() (it checks adapters against this bank)
            if self._pending_bank is not None:  # superseded: the newer bank wins
                if not self._pending_bank[2].done():
                    self._pending_bank[2].set_result(None)
            self._pending_bank = (bank, version, future)
        self._inbox.put(("wake", None, None))
        await asyncio.wrap_future(future)

    def adapter_names(self) -> list[str]:
        return list(self.runtime.bank.bank.adapters) if self.runtime.bank is not None else []

    def _knows_adapter(self, name: str) -> bool:
        pending = self._pending_bank
        if pending is not None:
            return pending[0] is not None and name in pending[0].adapters
        attached = self.runtime.bank
        return attached is not None and name in attached.bank.adapters

    def _servable_now(self, name: str) -> bool:
        """In the attached bank (and, by the caller's check, in the pending one if a swap waits: rows
        for adapters the new bank drops are refused, or the swap could wait for them forever)."""
        return self.runtime.bank is not None and name in self.runtime.bank.bank.adapters

    def stats(self) -> EngineStats:
        return self._stats.model_copy(update={"running": len(self._table), "waiting": len(self._waiting)})

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(("wake", None, None))
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ data plane
    async def generate(self, request: GenerationRequest,
                       modifiers: Sequence[RowModifier] = ()) -> AsyncIterator[GenerationEvent]:
        """Queue the request; yield its events; the last is final. Leaving early cancels the row."""
        check_supported(self.capabilities, modifiers)
        prompt = next((ids for m in modifiers if (ids := m.prompt_ids(self.tokenizer, request)) is not None), None)
        prompt = prompt if prompt is not None else encode_prompt(self.tokenizer, request)
        if len(prompt) > self.config.max_prompt_tokens:
            raise EngineError(400, f"prompt has {len(prompt)} tokens, more than this pool's limit of "
                                   f"{self.config.max_prompt_tokens}; shorten the prompt")
        if not prompt:
            raise EngineError(400, "prompt: empty; send at least one token of text")
        for m in modifiers:
            if m.kind == ADAPTER and not self._knows_adapter(m.name):  # type: ignore[attr-defined]
                raise EngineError(404, f"adapter {m.name!r} is not in this replica's bank "  # type: ignore[attr-defined]
                                       f"(version {self.bank_version})")
        loop = asyncio.get_running_loop()
        row = Row(req=request, modifiers=tuple(modifiers), prompt_ids=prompt,
                   num_slots=sum(m.num_slots for m in modifiers), detok=Detokenizer(self.tokenizer, list(request.stop)),
                   loop=loop, queue=asyncio.Queue(), tenant=request.tenant, outbox=self._outbox)
        if request.seed is not None:
            row.generator = torch.Generator().manual_seed(request.seed)
        self._inbox.put(("row", row, None))
        try:
            while True:
                event = await row.queue.get()
                yield event
                if event.final:
                    return
        finally:
            if not row.done:
                row.cancelled = True
                self._inbox.put(("wake", None, None))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_num_threads(self.config.threads)
        with torch.inference_mode():
            while not self._stopped.is_set():
                busy = len(self._table) > 0 or len(self._waiting) > 0
                self._drain_inbox(block=not busy)
                try:
                    self._step()
                except Exception as exc:  # a bug must not kill the loop: fail the running rows, keep serving
                    log.error("engine.step_failed", error=repr(exc), exc_info=True)
                    for row in list(self._table.decoding) + list(self._table.prefilling):
                        row.fail(500, f"internal error: {exc!r}")
                        self._table.release(row)
                self._deliver()

    def _deliver(self) -> None:
        """Hand the step's events to their event loops: one thread-safe wake-up per loop, not per token."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(put_all, items)
        self._outbox.clear()

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, payload, future = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "row":
                self._waiting.push(payload)
            elif kind == "call":
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(payload())
                    except Exception as exc:
                        future.set_exception(exc)
        # ("wake": nothing to do)

    def _apply_pending_bank(self) -> None:
        with self._bank_lock:
            pending = self._pending_bank
        if pending is None:
            return
        bank, version, future = pending
        running = [m.name for r in self._table.decoding + self._table.prefilling  # type: ignore[attr-defined]
                   for m in r.modifiers if m.kind == ADAPTER]
        if running:
            return  # adapter rows finish on the bank they started with (no answer mixes two banks)
        with self._bank_lock:
            if self._pending_bank is not pending:
                return  # superseded meanwhile: the next step applies the newer one
        # The swap stays pending while set_bank runs: generate() checks adapters against the pending
        # bank, never against the moment between detaching the old bank and attaching the new one.
        try:
            self.set_bank(bank, version)
        except Exception as exc:
            failed: Exception | None = exc
        else:
            failed = None
        with self._bank_lock:  # swap_bank resolves a superseded swap's future under the same lock
            if self._pending_bank is pending:  # a newer swap queued meanwhile stays pending
                self._pending_bank = None
            if not future.done():
                if failed is not None:
                    future.set_exception(failed)
                else:
                    future.set_result(None)

    def _step(self) -> None:
        self._apply_pending_bank()
        self._drop_cancelled()
        self._admit()
        chunks = plan_prefill(self._table.prefilling, self.config.prefill_chunk_tokens)
        if chunks:
            self._prefill(chunks)
        if self._table.decoding:
            self._decode()

    def _drop_cancelled(self) -> None:
        self._waiting.remove_if(lambda r: r.cancelled)
        for row in [r for r in self._table.decoding + self._table.prefilling if r.cancelled]:
            row.done = True
            self._apply_moves(self._table.release(row))

    def _admit(self) -> None:
        deferred = []
        while self._table.free > 0:
            row = self._waiting.pop()
            if row is None:
                break
            if row.cancelled:
                continue
            names = [m.name for m in row.modifiers if m.kind == ADAPTER]  # type: ignore[attr-defined]
            if any(not self._knows_adapter(n) for n in names):
                row.fail(404, f"adapter {names[0]!r} is not in this replica's bank (version {self.bank_version})")
                continue
            if names and (self._pending_bank is not None or any(not self._servable_now(n) for n in names)):
                deferred.append(row)  # a swap is pending: adapter rows start on the new bank, after it
                continue
            self._table.admit(row)
            self._stats.rows_served += 1
        for row in deferred:
            self._waiting.push(row)

    def _apply_moves(self, moves) -> None:
        for mv in moves:
            (self.cache.swap if mv.swap else self.cache.move)(mv.src, mv.dst, mv.length)

    # ------------------------------------------------------------------ forwards
    def _forward(self, batch: ForwardBatch, rows: list[Row], input_ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """One backbone forward with the rows' modifiers active; returns hidden states (B, T, d)."""
        inner = self.model.get_decoder()
        with apply_all(batch, [r.modifiers for r in rows]):
            if batch.embeds is not None:
                out = inner(inputs_embeds=batch.embeds, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True)
            else:
                out = inner(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state

    def _prefill(self, chunks) -> None:
        rows: list[Row] = [c.row for c in chunks]
        width = max(c.length for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens = rows[i].prompt_ids[c.start: c.start + c.length]  # slot positions stay pad ids
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        starts = [c.start for c in chunks]
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None]
        mask = attention_mask(starts, [c.length for c in chunks], width)
        embeds = self.model.get_input_embeddings()(ids)
        spans = [RowSpan(c.start, c.length, len(r.prompt_ids), r.prompt_ids) for c, r in zip(chunks, rows, strict=True)]
        batch = ForwardBatch("prefill", self.runtime, spans, embeds)
        self.cache.bind([r.slot for r in rows], starts, width)
        try:
            hidden = self._forward(batch, rows, ids, positions, mask)
        except Exception as exc:
            log.error("engine.prefill_failed", error=repr(exc), rows=len(rows), exc_info=True)
            for row in rows:
                row.fail(500, f"internal error: {exc!r}")
                self._apply_moves(self._table.release(row))
            return
        self._stats.prefill_forwards += 1
        done = [(i, c) for i, c in enumerate(chunks) if c.completes]
        for c in chunks:
            c.row.cached = c.start + c.length
        if not done:
            return
        last = torch.stack([hidden[i, c.length - 1] for i, c in done])
        logits = self.model.get_output_embeddings()(last).float()
        finished = [rows[i] for i, _ in done]
        tokens = next_tokens(logits, finished, first=True)
        for row, token in zip(finished, tokens, strict=True):
            self._apply_moves(self._table.promote(row))
            self._advance(row, token)

    def _decode(self) -> None:
        rows = list(self._table.decoding)
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long)
        starts = [r.cached for r in rows]
        positions = torch.tensor(starts)[:, None]
        mask = attention_mask(starts, [1] * len(rows), 1)
        spans = [RowSpan(r.cached, 1, len(r.prompt_ids), r.prompt_ids) for r in rows]
        self.cache.bind(list(range(len(rows))), starts, 1)
        hidden = self._forward(ForwardBatch("decode", self.runtime, spans), rows, ids, positions, mask)
        for r in rows:
            r.cached += 1
        logits = self.model.get_output_embeddings()(hidden[:, -1]).float()
        self._stats.steps += 1
        self._stats.batched_steps += len(rows) > 1
        self._stats.peak_batch_rows = max(self._stats.peak_batch_rows, len(rows))
        if self._on_step is not None:
            self._on_step(len(rows))
        for row, token in zip(rows, next_tokens(logits, rows), strict=True):
            self._advance(row, token)

    # ------------------------------------------------------------------ tokens

    def _advance(self, row: Row, token: int) -> None:
        if row.advance(token, self.stop_ids):
            self._apply_moves(self._table.release(row))
