"""BASELINE ONLY: transformers' ``ContinuousBatchingManager`` behind the Engine protocol (base model).

The option the issue asked us to look at first (docs/serving.md says why the torch engine has its
own scheduler). Here it serves the base model only — no per-row adapters or experts, greedy only —
so ``bench/serving.py`` can compare its batching speed with ours on the same workload. Sized as
the notes advise for CPU: explicit ``num_blocks`` / ``max_batch_tokens`` / ``page_size`` (the
defaults read host RAM and tried to allocate a 21.5 GB mask), no prefix block sharing, and a
warm-up forward on the constructing thread. Not used by the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import torch

from serve_app.replica.engine_api import EngineCapabilities, check_supported
from serve_app.replica.modifiers import RowModifier
from serve_app.replica.rows import encode_prompt
from serve_app.wire import EngineStats, GenerationEvent, GenerationRequest, ReplicaError


class HFContinuousBatching:
    """Greedy base-model generation through one persistent ``ContinuousBatchingManager``."""

    def __init__(self, model, tokenizer, max_rows: int = 16, max_len: int = 1024, page_size: int = 32,
                 max_batch_tokens: int = 512):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.tokenizer, self.model = tokenizer, model.eval()
        with torch.inference_mode():  # first multithreaded op on this thread (see the notes' trap)
            model(input_ids=torch.tensor([[0, 0]]))
        blocks = max_rows * (-(-max_len // page_size)) + 8
        config = ContinuousBatchingConfig(page_size=page_size, num_blocks=blocks, max_batch_tokens=max_batch_tokens,
                                          max_requests_per_batch=max_rows, allow_block_sharing=False)
        generation = GenerationConfig(do_sample=False, max_new_tokens=max_len // 2, pad_token_id=tokenizer.pad_token_id)
        self.manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        self.manager.start()
        self.capabilities = EngineCapabilities(name="transformers-continuous-batching", modifiers=frozenset(),
                                               continuous_batching=True, max_batch_rows=max_rows)
        self.bank_version = None
        self._stats = EngineStats(engine="hf-cb")

    def set_bank(self, bank, version) -> None:
        if bank is not None:
            raise ValueError("this baseline serves the base model only")

    async def swap_bank(self, bank, version) -> None:
        self.set_bank(bank, version)

    def adapter_names(self) -> list[str]:
        return []

    def run_between_steps(self, fn):
        raise NotImplementedError("no control work in this baseline")

    def stats(self) -> EngineStats:
        return self._stats.model_copy()

    @property
    def alive(self) -> bool:
        return self.manager.is_running()

    def shutdown(self) -> None:
        self.manager.stop(block=True, timeout=10)

    async def generate(self, request: GenerationRequest,
                       modifiers: Sequence[RowModifier] = ()) -> AsyncIterator[GenerationEvent]:
        check_supported(self.capabilities, modifiers)
        ids = encode_prompt(self.tokenizer, request)
        results: asyncio.Queue = asyncio.Queue()
        self.manager.register_result_handler(request.request_id, results.put_nowait)
        eos = [] if request.ignore_eos else None  # [] = never stop early: fixed output lengths
        self.manager.add_request(ids, request_id=request.request_id, max_new_tokens=request.max_tokens, streaming=True,
                                 eos_token_id=eos)
        self._stats.rows_served += 1
        emitted = 0
        while True:
            out = await results.get()
            if out.error:
                yield GenerationEvent(error=ReplicaError(message=f"transformers: {out.error}"))
                return
            tokens = out.generated_tokens
            if out.is_finished():
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                yield GenerationEvent(text=text[emitted:], finish_reason="length", prompt_tokens=len(ids),
                                      completion_tokens=len(tokens))
                return
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > emitted:
                yield GenerationEvent(text=text[emitted:])
                emitted = len(text)
