"""``LLMReplica``: one Serve deployment per model pool.

Each replica hosts the pool's base LLM in an engine (:mod:`serve_app.replica.engine_api`: the torch
engine, or vLLM), the pool's current adapter bank (every adapter of every tenant, applied per row inside one batched
forward) and an LRU of Llamdex experts + connectors loaded through ``@serve.multiplexed`` keyed by
``tenant/name@e<expert version>.c<connectors version>`` (:mod:`serve_app.replica.expert_runtime`), so Serve
routes a tenant's expert traffic to replicas that already hold it. The replica turns a request's
adapter / expert into typed per-row modifiers (:mod:`serve_app.replica.modifiers`) and checks them
against the engine's capabilities; expert rows join the same running batch as base and adapter
rows; ``predict`` batches expert predictions. Payloads both ways are the pydantic models of
:mod:`serve_app.wire`. New bank versions are picked up without restart: the router broadcasts
``reload_bank`` after it publishes one, ``reconfigure({"bank_version": n})`` pins a version,
and every replica also polls the registry every ``bank_poll_s`` seconds (for banks published by
jobs). Swaps run on the engine thread between steps, so no request fails during a swap.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from cluster.logs import get_logger
from cluster.models import check_model_match, load_model, resolve_model
from cluster.registry import SYSTEM_TENANT, Registry
from cluster.settings import load_settings
from cluster.validators import install_validators
from serve_app.config import PoolConfig
from serve_app.metrics import ReplicaMetrics
from serve_app.replica.engine_api import Engine, check_supported
from serve_app.replica.expert_runtime import (
    EnginePredictor,
    ExpertCacheStats,
    ExpertKey,
    LoadedExpert,
    PredictBatcher,
    expert_prompt_ids,
    load_expert_bundle,
    question_of,
)
from serve_app.replica.modifiers import EXPERT, AdapterModifier, ExpertModifier, RowModifier
from serve_app.wire import (
    BankStatus,
    EngineError,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    PredictCall,
    PredictReply,
    PredictResult,
    ReplicaError,
    ReplicaStats,
)

log = get_logger("replica")


def make_engine(pool: PoolConfig, model, settings, on_step=None) -> Engine:
    """The engine a pool's config asks for, loaded with the pool's base model."""
    if pool.engine == "vllm":
        from serve_app.replica.engine_vllm import VLLMEngine, vllm_options

        return VLLMEngine(model.path, settings.home / "vllm-adapters" / pool.name, vllm_options(pool))
    from serve_app.replica.engine_torch import TorchEngine

    lm, tok = load_model(model, pool.dtype)
    return TorchEngine(lm, tok, pool.torch_engine_config(), on_step=on_step)


class LLMReplica:
    """The replica class; ``serve_app.app`` turns it into one deployment per pool."""

    def __init__(self, pool: dict, store: str):
        self.pool = PoolConfig.model_validate(pool)
        install_validators()
        self.registry = Registry(store)
        self.settings = load_settings()
        started = time.perf_counter()
        self.model = resolve_model(self.pool.model, self.settings)
        self.metrics = ReplicaMetrics(self.pool.name)
        self.engine: Engine = make_engine(self.pool, self.model, self.settings, on_step=self._observe_step)
        self.expert_stats = ExpertCacheStats()
        self.predictor: PredictBatcher | EnginePredictor | None = None
        if EXPERT in self.engine.capabilities.modifiers:
            self.predictor = self._predictor()
        self.pinned_bank: int | None = None
        self._bank_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._load_bank_sync(None)
        self.get_expert = serve.multiplexed(max_num_models_per_replica=self.pool.max_experts_per_replica)(
            self._expert_loader())
        log.info("replica.ready", pool=self.pool.name, model=self.model.id, engine=self.engine.capabilities.name,
                 bank_version=self.engine.bank_version, seconds=round(time.perf_counter() - started, 2))

    def _predictor(self) -> PredictBatcher | EnginePredictor:
        """What answers ``predict``: an engine that predicts by itself (vLLM with the plugin batches expert
        rows with everything else), else a PredictBatcher over the engine's torch model."""
        if self.engine.capabilities.predicts_experts:
            return EnginePredictor(self.engine)
        return PredictBatcher(self.engine.model, self.engine.tokenizer,  # type: ignore[attr-defined]
                              self.pool.max_batch_size, self.pool.batch_wait_ms / 1000, self.engine.run_between_steps)

    def _observe_step(self, rows: int) -> None:
        self.metrics.batch_rows.observe(rows, tags=self.metrics.tags)

    # ------------------------------------------------------------------ bank
    def _latest_bank_version(self) -> int | None:
        versions = self.registry.versions(SYSTEM_TENANT, "bank", self.pool.bank_name)
        return versions[-1] if versions else None

    def _read_bank(self, version: int):
        from compression import load_bank

        manifest = self.registry.resolve(SYSTEM_TENANT, "bank", self.pool.bank_name, version)
        path = self.registry.materialize(manifest, self.settings.home / "artifact-cache")
        bank = load_bank(Path(path))
        check_model_match({"id": bank.base_model, "content_hash": bank.base_model_hash}, self.model, "bank")
        return bank

    def _load_bank_sync(self, version: int | None) -> None:
        version = version or self._latest_bank_version()
        if version is None or version == self.engine.bank_version:
            return
        self.engine.set_bank(self._read_bank(version), version)
        self.metrics.bank_version.set(version, tags=self.metrics.tags)
        log.info("replica.bank_loaded", pool=self.pool.name, version=version,
                 adapters=len(self.engine.adapter_names()))

    async def reload_bank(self, version: int | None = None) -> BankStatus:
        """Load ``version`` (default: latest, unless pinned) if it differs from the current one."""
        async with self._bank_lock:
            target = version or self.pinned_bank or await asyncio.to_thread(self._latest_bank_version)
            if target is not None and target != self.engine.bank_version:
                try:
                    bank = await asyncio.to_thread(self._read_bank, target)
                    await self.engine.swap_bank(bank, target)
                except Exception as exc:  # keep serving the old bank; say why
                    log.error("replica.bank_rejected", pool=self.pool.name, version=target, error=str(exc))
                    return BankStatus(bank_version=self.engine.bank_version, error=str(exc))
                self.metrics.bank_version.set(target, tags=self.metrics.tags)
                log.info("replica.bank_swapped", pool=self.pool.name, version=target, adapters=len(bank.adapters))
        return BankStatus(bank_version=self.engine.bank_version)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config``: ``{"bank_version": n}`` pins a bank version (None = follow latest)."""
        self.pinned_bank = (user_config or {}).get("bank_version")
        await self.reload_bank(self.pinned_bank)

    async def _poll_banks(self) -> None:
        while True:
            await asyncio.sleep(self.pool.bank_poll_s)
            try:
                await self.reload_bank()
            except Exception as exc:
                log.error("replica.poll_failed", error=repr(exc))

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_banks())

    # ------------------------------------------------------------------ experts
    def _expert_loader(self):
        async def load(expert_key: str) -> LoadedExpert:
            key = ExpertKey.parse(expert_key)
            started = time.perf_counter()
            try:
                bundle = await asyncio.to_thread(load_expert_bundle, self.registry, key, self.model,
                                                 self.settings.home / "artifact-cache")
            except EngineError as exc:
                log.error("replica.expert_rejected", pool=self.pool.name, expert=expert_key, error=str(exc))
                raise
            except Exception as exc:  # storage trouble etc.: say so, do not crash the replica
                log.error("replica.expert_load_failed", pool=self.pool.name, expert=expert_key, error=repr(exc))
                raise EngineError(503, f"expert {expert_key}: loading failed ({exc!r}); retry shortly") from None
            entry = LoadedExpert(key, bundle, time.perf_counter() - started, self._expert_evicted)
            self.expert_stats.loaded(entry)
            self.metrics.experts_resident.set(len(self.expert_stats.resident), tags=self.metrics.tags)
            log.info("replica.expert_loaded", pool=self.pool.name, expert=expert_key, seconds=round(entry.seconds, 3),
                     layer=bundle.spec.layer, slots=bundle.spec.num_slots)
            return entry
        return load

    def _expert_evicted(self, expert_key: str) -> None:
        self.expert_stats.evicted(expert_key)
        self.metrics.experts_resident.set(len(self.expert_stats.resident), tags=self.metrics.tags)
        log.info("replica.expert_evicted", pool=self.pool.name, expert=expert_key)

    async def _bundle(self, expert_key: str):
        """The bundle for ``expert_key`` from the LRU (loading it on a miss); counts hits and misses."""
        if self.predictor is None:
            raise EngineError(400, f"pool {self.pool.name!r} runs the {self.engine.capabilities.name} engine, which "
                                   "cannot run Llamdex experts; send expert traffic to a pool that serves them")
        hit = expert_key in self.expert_stats.resident
        entry = await self.get_expert(expert_key)
        bundle = entry.bundle
        if bundle is None:  # evicted between the LRU's answer and now: load it again
            hit, bundle = False, (await self.get_expert(expert_key)).bundle
        (self.metrics.expert_hits if hit else self.metrics.expert_misses).inc(tags=self.metrics.tags)
        if hit:
            self.expert_stats.hits += 1
        else:
            self.expert_stats.misses += 1
        return bundle

    # ------------------------------------------------------------------ requests
    async def _modifiers(self, request: GenerationRequest) -> list[RowModifier]:
        """The per-row modifiers a request needs (checked against the engine's capabilities)."""
        modifiers: list[RowModifier] = []
        if request.expert:
            question_of(request)  # refuse a request without a question before loading anything
            modifiers.append(ExpertModifier(request.expert, await self._bundle(request.expert)))
        if request.adapter:
            if request.adapter not in self.engine.adapter_names():
                await self.reload_bank()  # published a moment ago? pick it up now
            modifiers.append(AdapterModifier(request.adapter))
        check_supported(self.engine.capabilities, modifiers)
        return modifiers

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the request's events; the last has ``finish_reason`` or ``error``."""
        self._ensure_poller()
        request = GenerationRequest.model_validate(request)
        try:
            modifiers = await self._modifiers(request)
            async for event in self.engine.generate(request, modifiers):
                yield event
        except EngineError as exc:
            yield GenerationEvent(error=ReplicaError(status=exc.status, message=str(exc)))

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Non-streaming: the whole text and the final event's fields."""
        return GenerationResult.collect([event async for event in self.generate_stream(request)])

    async def predict(self, call: PredictCall) -> PredictReply:
        """One expert prediction (batched with concurrent ones): label, probabilities, features."""
        self._ensure_poller()
        try:
            call = PredictCall.model_validate(call)
            key = ExpertKey.parse(call.expert)
            if not call.question.strip():
                raise EngineError(400, "question: must be a non-empty string")
            bundle = await self._bundle(str(key))
            if self.predictor is None:
                raise EngineError(400, "this pool cannot run experts")
            n_tokens = len(expert_prompt_ids(self.engine.tokenizer, bundle, GenerationRequest(
                request_id="-", prompt=call.question)))
            if n_tokens > self.pool.max_prompt_tokens:
                raise EngineError(400, f"question: {n_tokens} prompt tokens, more than this pool's limit of "
                                       f"{self.pool.max_prompt_tokens}; shorten it")
            result = await self.predictor.predict(bundle, call.question)
        except EngineError as exc:
            return PredictReply(error=ReplicaError(status=exc.status, message=str(exc)))
        return PredictReply(result=PredictResult(
            label=result["label"], probabilities=result["probabilities"], features=result["features"],
            stated=result.get("stated", []), not_stated=result.get("not_stated", []),
            read_by_meaning=result.get("read_by_meaning", {}),
            expert_probabilities=result["expert_probabilities"], expert_key=str(key),
            expert_version=key.expert_version, connectors_version=key.connectors_version,
            layer=bundle.spec.layer, num_slots=bundle.spec.num_slots, prompt_tokens=n_tokens,
            batch_rows=result["batch_rows"]))

    async def stats(self) -> ReplicaStats:
        gc.collect()  # so 'experts_alive' counts only bundles something still references
        e = self.expert_stats
        return ReplicaStats(
            pool=self.pool.name, model=self.model.id, replica=serve.get_replica_context().replica_id.unique_id,
            bank_version=self.engine.bank_version, adapters=len(self.engine.adapter_names()),
            engine=self.engine.stats(), experts_resident=sorted(e.resident), experts_alive=e.alive(),
            expert_loads=e.loads, expert_hits=e.hits, expert_misses=e.misses, expert_evictions=e.evictions,
            expert_last_load_s=e.last_load_s, predict_batches=self.predictor.batches if self.predictor else 0)

    async def check_health(self) -> None:
        """Serve calls this periodically; raising restarts the replica."""
        self._ensure_poller()
        if not self.engine.alive:
            raise RuntimeError("engine loop died")


def pool_deployment(pool: PoolConfig):
    """The Serve deployment for ``pool``: resources, autoscaling and limits from its config."""
    a = pool.autoscaling
    return serve.deployment(LLMReplica).options(
        name=f"pool-{pool.name}",
        ray_actor_options={"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
        max_ongoing_requests=pool.max_ongoing_requests,
        max_queued_requests=pool.max_queued_requests,
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "initial_replicas": max(a.min_replicas, 1),
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                            "look_back_period_s": a.look_back_period_s},
        health_check_period_s=10, graceful_shutdown_timeout_s=30, graceful_shutdown_wait_loop_s=2,
    )
