"""The torch engine: batched generation where every row may use a different adapter (and expert).

An asyncio loop collects requests into *waves* (up to ``max_batch_size`` rows, waiting at most
``batch_wait_ms`` for company), and one worker thread runs each wave: left-padded prefill,
then token-by-token decoding with the KV cache. Each row carries its own adapter index into
the compressed bank (applied inside the same forward by ``compression.BankLinear``), its own
Llamdex expert bundle or None (through ``expert_prompt`` / ``prefill_hook``, see
:mod:`serve_app.experts`), its own sampling settings and stop conditions, and streams its text
deltas back through its own queue. Bank swaps happen on the same thread between waves, so no
request ever sees half a bank.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from cluster.logs import get_logger
from llamdex.prompting import end_of_turn_ids

log = get_logger("engine")


class GenerationRequest(BaseModel):
    """What the router sends to a replica (already authorised and resolved)."""

    request_id: str
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    adapter: str | None = None
    """Bank adapter id (``tenant/name``) or None for the base model."""
    expert: str | None = None
    """Expert key ``tenant/name@version`` (Llamdex) or None."""
    tenant: str = "-"
    model: str = "base"


class Event(BaseModel):
    """One streamed piece of a generation; the last one has ``finish_reason`` and usage."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_status: int = 500
    extra: dict[str, Any] = {}


class EngineError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Row:
    req: GenerationRequest
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    prompt_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False
    generator: torch.Generator | None = None
    expert: Any = None
    """The row's Llamdex bundle (``llamdex.insertion.Bundle``) or None."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Sent with the final event (e.g. an expert's prediction)."""

    def push(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class TorchEngine:
    """Owns the model on one replica; ``generate`` is safe to call concurrently."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                 max_prompt_tokens: int = 2048, threads: int = 1):
        torch.set_num_threads(threads)
        self.model, self.tok = model, tokenizer
        self.tok.padding_side = "left"
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_ms / 1000
        self.max_prompt_tokens = max_prompt_tokens
        self.bank_handle = None
        self.bank_version: int | None = None
        self.prefill_hook: Callable | None = None
        """``(model, rows, input_ids, attention_mask, position_ids) -> logits, cache, mask, positions``:
        the prefill of waves holding expert rows (``row.expert`` set)."""
        self.expert_prompt: Callable | None = None
        """``(tokenizer, bundle, request) -> prompt ids`` for expert rows."""
        self._pending: asyncio.Queue[_Row] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop_task: asyncio.Task | None = None
        self._control: list[Callable[[], None]] = []
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.waves = 0
        self.rows_served = 0
        self.on_wave: Callable[[int], None] | None = None
        """Called with the number of rows of every wave (metrics)."""

    # ------------------------------------------------------------------ control plane
    def run_on_engine_thread(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between waves (used for bank swaps)."""
        return self._executor.submit(fn)

    def set_bank(self, bank, version: int | None) -> None:
        """Attach ``bank`` (a compression.Bank, or None) replacing the current one. Engine thread only."""
        from compression import attach_bank

        if self.bank_handle is not None:
            self.bank_handle.detach()
            self.bank_handle = None
        if bank is not None:
            self.bank_handle = attach_bank(self.model, bank)
        self.bank_version = version

    def adapter_names(self) -> list[str]:
        return list(self.bank_handle.bank.adapters) if self.bank_handle else []

    @property
    def alive(self) -> bool:
        return self._loop_task is None or not self._loop_task.done()

    # ------------------------------------------------------------------ data plane
    async def generate(self, req: GenerationRequest, expert: Any = None) -> AsyncIterator[Event]:
        """Queue ``req`` (with its expert bundle, if any) for the next wave and yield its events."""
        if expert is not None and (self.prefill_hook is None or self.expert_prompt is None):
            raise EngineError(501, "this engine has no expert runtime (prefill_hook / expert_prompt unset)")
        if self._pending is None:
            self._pending = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._wave_loop())
        row = _Row(req=req, queue=asyncio.Queue(), loop=asyncio.get_running_loop(), expert=expert)
        await self._pending.put(row)
        while True:
            event = await row.queue.get()
            yield event
            if event.finish_reason is not None or event.error is not None:
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
            del rows  # do not keep the last wave's rows (and their expert bundles) alive while idle

    def _run_wave_safely(self, rows: list[_Row]) -> None:
        try:
            self._run_wave(rows)
        except EngineError as exc:
            for row in rows:
                if not row.done:
                    row.push(Event(error=str(exc), error_status=exc.status))
        except Exception as exc:  # a bug must not kill the loop: fail this wave's rows, keep serving
            log.error("engine.wave_failed", error=repr(exc), rows=len(rows), exc_info=True)
            for row in rows:
                if not row.done:
                    row.push(Event(error=f"internal error: {exc!r}"))

    # ------------------------------------------------------------------ one wave
    def _encode(self, row: _Row) -> list[int]:
        req = row.req
        if row.expert is not None:
            return list(self.expert_prompt(self.tok, row.expert, req))
        if req.messages is not None:
            ids = self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        else:
            ids = self.tok(req.prompt or "", add_special_tokens=False)["input_ids"]
        return list(ids)

    def _run_wave(self, rows: list[_Row]) -> None:
        start = time.perf_counter()
        live = []
        for row in rows:
            row.prompt_ids = self._encode(row)
            if len(row.prompt_ids) > self.max_prompt_tokens:
                row.done = True
                row.push(Event(error=f"prompt has {len(row.prompt_ids)} tokens, more than this pool's limit "
                                     f"of {self.max_prompt_tokens}; shorten the prompt", error_status=400))
                continue
            if row.req.adapter is not None and row.req.adapter not in self.adapter_names():
                row.done = True
                row.push(Event(error=f"adapter {row.req.adapter!r} is not in this replica's bank "
                                     f"(version {self.bank_version})", error_status=404))
                continue
            if row.req.seed is not None:
                row.generator = torch.Generator().manual_seed(row.req.seed)
            live.append(row)
        if not live:
            return
        self.waves += 1
        self.rows_served += len(live)
        if self.on_wave is not None:
            self.on_wave(len(live))
        pad = self.tok.pad_token_id
        width = max(len(r.prompt_ids) for r in live)
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in live])
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in live])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        adapters = [r.req.adapter for r in live]
        bank_ctx = self.bank_handle.using(adapters) if self.bank_handle else nullcontext()
        with torch.inference_mode(), bank_ctx:
            if any(r.expert is not None for r in live):
                logits, cache, attention, positions = self.prefill_hook(
                    self.model, live, input_ids, attention, positions)
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 use_cache=True)
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
        log.debug("engine.wave", rows=len(live), seconds=round(time.perf_counter() - start, 3))

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        logits = logits.float()
        out = torch.empty(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            t, p = row.req.temperature, row.req.top_p
            if t == 0:
                out[i] = int(logits[i].argmax())
                continue
            probs = torch.softmax(logits[i] / t, dim=-1)
            if p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                probs = probs / probs.sum()
            out[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return out

    def _advance(self, row: _Row, token: int) -> None:
        """Append one token to ``row``; emit the new text; finish on EOS, stop string or length."""
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        else:
            row.generated.append(token)
        text = self.tok.decode(row.generated, skip_special_tokens=True)
        for s in row.req.stop:
            cut = text.find(s)
            if cut != -1:
                text, finish = text[:cut], "stop"
        if finish is None and len(row.generated) >= row.req.max_tokens:
            finish = "length"
        holdback = 0 if finish else max([len(s) - 1 for s in row.req.stop] + [0])
        if not finish and text.endswith("\ufffd"):
            holdback = max(holdback, 1)  # an incomplete multi-byte character
        ready = len(text) - holdback
        delta = text[row.emitted:ready] if ready > row.emitted else ""
        row.emitted = max(row.emitted, ready)
        if finish:
            row.done = True
            row.push(Event(text=delta, finish_reason=finish, prompt_tokens=len(row.prompt_ids),
                           completion_tokens=len(row.generated), extra=row.extra))
        elif delta:
            row.push(Event(text=delta))
