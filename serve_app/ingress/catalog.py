"""What a caller may use, and where it runs: the router's view of the registry.

A request's ``model`` is ``base``, ``<tenant>/<name>`` (an adapter in a pool's bank, or an
expert with published connectors) or ``auto``. :class:`Catalog` lists these per caller, resolves
a name to a :class:`Target` (kind, pool, multiplexed expert key) and implements ``auto``.

An expert is servable on the pools that serve experts (``PoolConfig.serves``: torch pools, and
vLLM pools with ``vllm.experts``) whose base model has the content hash its connectors were
trained for; its listing and its resolved target carry its version's DP ledger
(``privacy``, read from expert.json by :func:`cluster.ledger.expert_ledger`); its multiplexed key ``<tenant>/<name>@e<expert version>.c<connectors version>``
(:mod:`serve_app.replica.expert_runtime`) changes whenever either artifact is re-published.

* **which customization** — :mod:`serve_app.ingress.routing`: each candidate is a profile of short
  documents (an adapter's description and uploaded example prompts; an expert's description,
  schema question, classes, features and questions composed from its schema), embedded by
  all-MiniLM-L6-v2 with the shipped intent adapter merged in (``routing.method``, default ``minilm-intent``);
  the best mean similarity wins if it stands
  ``routing.threshold`` standard deviations above that customization's similarity to general
  requests, unless the tenant's feedback memory (``POST /v1/feedback``) has a prompt this alike;
  otherwise ``base``. The response reports the scores and what matched.
* **which pool** — :func:`serve_app.ingress.routing.pools.choose_pool`: ``latency``/``cost`` hints pick
  by tier among pools that can serve the target, ``max_latency_ms`` the cheapest pool whose
  recent p50 (measured by this router) fits, with a stated fallback; otherwise the
  customization's own pool or the default pool.

Listings are cached for ``catalog_ttl_s`` and invalidated when the router itself publishes. A
request naming a model the cached listing lacks (or has without a pool yet) re-reads the
registry if the listing is older than ``catalog_miss_refresh_s``, so artifacts published by
jobs straight into the registry are served within that bound instead of the TTL.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field

from cluster.artifacts import NAME_PATTERN
from cluster.ledger import expert_ledger
from cluster.logs import get_logger
from cluster.models import ModelError, resolve_model
from cluster.registry import SYSTEM_TENANT, TENANT_PATTERN, NotFound, Principal, Registry
from serve_app.config import AppConfig
from serve_app.ingress.openai_api import OpenAIError, RoutingHints
from serve_app.ingress.routing import (
    BASE,
    Profile,
    adapter_profile,
    build_recommender,
    check_examples,
    expert_profile,
)
from serve_app.ingress.routing.feedback import FeedbackStore
from serve_app.ingress.routing.pools import PoolChoiceError, PoolLatency, choose_pool

log = get_logger("catalog")


@dataclass(frozen=True)
class Customization:
    model_id: str  # "tenant/name"
    tenant: str
    name: str
    kind: str  # "adapter" | "expert"
    version: int
    pools: tuple[str, ...]
    description: str
    extra: dict = field(default_factory=dict)
    profile: Profile | None = field(default=None, compare=False)  # what model="auto" compares prompts with

    @property
    def expert_key(self) -> str | None:
        if self.kind != "expert":
            return None
        return f"{self.model_id}@e{self.version}.c{self.extra['connectors_version']}"


@dataclass(frozen=True)
class Target:
    """A resolved request: what to run and on which pool."""

    model_id: str
    kind: str  # "base" | "adapter" | "expert"
    tenant: str | None
    pool: str
    adapter: str | None = None
    expert_key: str | None = None
    routing: dict | None = None
    expert_version: int | None = None
    privacy: dict | None = None  # the expert version's DP ledger (cluster.ledger.expert_ledger)


class Catalog:
    """Router-side resolution of model names; thread-safe, cached."""

    def __init__(self, registry: Registry, config: AppConfig):
        self.registry, self.config = registry, config
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, list[Customization]]] = {}
        self._banks: tuple[float, dict[str, set[str]]] | None = None
        self._pool_hashes: dict[str, str | None] | None = None
        self._connectors_base: dict[tuple[str, str, int], dict] = {}  # versions are immutable: no expiry
        self._profiles: dict[tuple, Profile] = {}  # (model id, versions): immutable too
        r = config.routing
        self.feedback = FeedbackStore(registry.store, r.memory_size, r.decision_ttl_s, config.catalog_ttl_s)
        self.latency = PoolLatency(r.latency_window_s, min_samples=r.latency_min_samples)
        self._recommender = None
        self._recommender_ready = threading.Event()
        threading.Thread(target=self._load_recommender, name="auto-recommender", daemon=True).start()

    def _load_recommender(self) -> None:
        """Load the embedder once, off the request path (the first auto request waits for it)."""
        started = time.perf_counter()
        try:
            self._recommender = build_recommender(self.config.routing, self.config.auto_min_similarity)
            log.info("catalog.recommender_ready", method=self._recommender.method,
                     seconds=round(time.perf_counter() - started, 2))
        except Exception as exc:  # e.g. the embedding wheel is missing: say so on every auto request
            self._recommender_error = f"{type(exc).__name__}: {exc}"
            log.error("catalog.recommender_failed", error=self._recommender_error)
        finally:
            self._recommender_ready.set()

    def recommender(self):
        """The loaded recommender (waits for the initial load); 503 if it could not be loaded."""
        self._recommender_ready.wait()
        if self._recommender is None:
            raise OpenAIError(503, "model='auto' is unavailable: its recommender failed to load "
                                   f"({getattr(self, '_recommender_error', 'unknown error')}); name a model, or fix "
                                   "routing.method in the pools file", type_="unavailable")
        return self._recommender

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()
            self._banks = None

    # ------------------------------------------------------------------ listings
    def bank_members(self, max_age_s: float | None = None) -> dict[str, set[str]]:
        """pool name -> adapter ids in that pool's latest bank (cached at most ``max_age_s``, default the TTL)."""
        max_age_s = self.config.catalog_ttl_s if max_age_s is None else min(max_age_s, self.config.catalog_ttl_s)
        with self._lock:
            if self._banks and time.monotonic() - self._banks[0] < max_age_s:
                return self._banks[1]
        members: dict[str, set[str]] = {}
        for pool in self.config.pools:
            try:
                manifest = self.registry.resolve(SYSTEM_TENANT, "bank", pool.bank_name)
                members[pool.name] = set(json.loads(self.registry.read_file(manifest, "bank.json"))["adapters"])
            except NotFound:
                members[pool.name] = set()
        with self._lock:
            self._banks = (time.monotonic(), members)
        return members

    def customizations(self, tenant: str, max_age_s: float | None = None) -> list[Customization]:
        """Every servable adapter and expert of ``tenant`` (cached at most ``max_age_s``, default the TTL)."""
        max_age_s = self.config.catalog_ttl_s if max_age_s is None else min(max_age_s, self.config.catalog_ttl_s)
        with self._lock:
            hit = self._cache.get(tenant)
            if hit and time.monotonic() - hit[0] < max_age_s:
                return hit[1]
        banks = self.bank_members(max_age_s)
        found: list[Customization] = []
        for m in self.registry.list_artifacts(tenant, "adapter"):
            model_id = f"{tenant}/{m.name}"
            pools = tuple(p for p, names in banks.items() if model_id in names)
            description = str(m.metadata.get("description", ""))
            profile = self._profile((model_id, "adapter", m.version), functools.partial(
                adapter_profile, model_id, description, _stored_examples(m.metadata)))
            found.append(Customization(model_id, tenant, m.name, "adapter", m.version, pools, description,
                                       {"in_bank": bool(pools)}, profile))
        for m in self.registry.list_artifacts(tenant, "connectors"):
            try:
                expert = self.registry.resolve(tenant, "expert", m.name)
            except NotFound:
                continue
            base = self._connectors_base_model(m)
            pools = self.expert_pools(base.get("hash"))
            spec = json.loads(self.registry.read_file(expert, "expert.json"))
            extra = {"expert_version": expert.version, "connectors_version": m.version,
                     "base_model": base.get("id"), "privacy": expert_ledger(self.registry, expert, spec)}
            text, schema, schema_version = _expert_text(self.registry, tenant, expert, spec)
            profile = self._profile((f"{tenant}/{m.name}", "expert", expert.version, schema_version),
                                    functools.partial(expert_profile, f"{tenant}/{m.name}",
                                                      str(expert.metadata.get("description", "")), schema,
                                                      self.config.routing.schema_questions))
            found.append(Customization(f"{tenant}/{m.name}", tenant, m.name, "expert", expert.version,
                                       pools, text, extra, profile))
        with self._lock:
            self._cache[tenant] = (time.monotonic(), found)
        return found

    def _profile(self, key: tuple, build) -> Profile:
        """A customization version's profile, built once (versions are immutable)."""
        with self._lock:
            hit = self._profiles.get(key)
        if hit is None:
            hit = build()
            with self._lock:
                self._profiles[key] = hit
        return hit

    def pool_model_hashes(self) -> dict[str, str | None]:
        """pool name -> content hash of its base model (None if it cannot be resolved here)."""
        if self._pool_hashes is None:
            hashes: dict[str, str | None] = {}
            for pool in self.config.pools:
                try:
                    hashes[pool.name] = resolve_model(pool.model, pull=False).content_hash
                except (ModelError, OSError):
                    hashes[pool.name] = None  # not on this node: let the replica check it
            self._pool_hashes = hashes
        return self._pool_hashes

    def expert_pools(self, connectors_hash: str | None) -> tuple[str, ...]:
        """Pools that serve experts (``PoolConfig.serves``) and whose base model the connectors were trained for."""
        hashes = self.pool_model_hashes()
        return tuple(p.name for p in self.config.pools if "expert" in p.serves
                     and hashes.get(p.name) in (None, connectors_hash))

    def _connectors_base_model(self, manifest) -> dict:
        key = (manifest.tenant, manifest.name, manifest.version)
        if key not in self._connectors_base:
            try:
                spec = json.loads(self.registry.read_file(manifest, "connectors.json"))
                self._connectors_base[key] = {"id": spec.get("base_model_id"), "hash": spec.get("base_model_hash")}
            except (NotFound, ValueError):
                self._connectors_base[key] = {}
        return self._connectors_base[key]

    def visible(self, principal: Principal) -> list[Customization]:
        if principal.is_admin:
            return [c for t in self.registry.list_tenants() for c in self.customizations(t.id)]
        return self.customizations(principal.tenant)

    # ------------------------------------------------------------------ resolution
    def resolve(self, principal: Principal, model: str, prompt: str, hints: RoutingHints | None) -> Target:
        """Map a request's ``model`` to a Target, enforcing tenant isolation."""
        if model == "base":
            pool, note = self._pick_pool([p.name for p in self.config.pools], hints)
            return Target("base", "base", principal.tenant, pool, routing=note)
        if model == "auto":
            return self._auto(principal, prompt, hints)
        tenant, sep, name = model.partition("/")
        if not sep or not name:
            raise OpenAIError(404, f"model {model!r} does not exist; use 'base', 'auto' or '<tenant>/<name>' "
                                   "(GET /v1/models lists yours)", param="model", code="model_not_found")
        if not principal.is_admin and tenant != principal.tenant:
            raise OpenAIError(403, f"this API key belongs to tenant {principal.tenant!r} and cannot use "
                                   f"models of tenant {tenant!r}", type_="permission_error", param="model")
        match = self._find(tenant, name)
        if match is None or not match.pools:  # published a moment ago by a job? re-read a stale-ish listing
            match = self._find(tenant, name, self.config.catalog_miss_refresh_s)
        if match is None:
            raise OpenAIError(404, f"model {model!r} does not exist", param="model", code="model_not_found")
        return self._target(match, hints, reason=None)

    def _find(self, tenant: str, name: str, max_age_s: float | None = None) -> Customization | None:
        if not TENANT_PATTERN.match(tenant) or not NAME_PATTERN.match(name):
            return None  # not a tenant id / artifact name (e.g. '..'): nothing to look up in the store
        return next((c for c in self.customizations(tenant, max_age_s) if c.name == name), None)

    def _target(self, c: Customization, hints: RoutingHints | None, reason: dict | None) -> Target:
        if not c.pools and c.kind == "expert":
            running = {p.name: p.model for p in self.config.pools if "expert" in p.serves}
            raise OpenAIError(422, f"{c.model_id}: its connectors (version {c.extra['connectors_version']}) were "
                                   f"trained for base model {c.extra.get('base_model')!r}, but no pool serving "
                                   "experts runs "
                                   f"that model (pools: {running}); fix: train connectors against a pool's base "
                                   "model (the connectors job) or add a pool running that model",
                              param="model", code="model_not_servable")
        if not c.pools:
            raise OpenAIError(503, f"{c.model_id} is uploaded but not in any pool's adapter bank yet; retry "
                                   "after the bank job (or the automatic projection) publishes", type_="unavailable")
        pool, note = self._pick_pool(list(c.pools), hints)
        routing = dict(reason or {})
        routing.update(note or {})
        return Target(c.model_id, c.kind, c.tenant, pool, adapter=c.model_id if c.kind == "adapter" else None,
                      expert_key=c.expert_key, routing=routing or None,
                      expert_version=c.version if c.kind == "expert" else None, privacy=c.extra.get("privacy"))

    def _pick_pool(self, candidates: list[str], hints: RoutingHints | None) -> tuple[str, dict | None]:
        """(pool, explanation) for the pools that can serve the model (serve_app.ingress.routing.pools)."""
        try:
            return choose_pool([self.config.pool(n) for n in candidates], hints, self.config.pool().name, self.latency)
        except PoolChoiceError as exc:
            raise OpenAIError(400, str(exc), param="atelier.pool") from None

    def _auto(self, principal: Principal, prompt: str, hints: RoutingHints | None) -> Target:
        candidates = [c for c in self.visible(principal) if c.pools and c.profile is not None and c.profile.documents]
        recommender = self.recommender()
        memory = self.feedback.memory(principal.tenant) if not principal.is_admin else []
        rec = recommender.recommend(prompt, [c.profile for c in candidates], memory)
        reason = rec.explain()
        if rec.chosen != BASE:
            return self._target(next(c for c in candidates if c.model_id == rec.chosen), hints, reason)
        pool, note = self._pick_pool([p.name for p in self.config.pools], hints)
        reason.update(note or {})
        return Target("base", "base", principal.tenant, pool, routing=reason)


def apply_feedback(catalog: Catalog, principal: Principal, body) -> dict:
    """``POST /v1/feedback``: add the tenant's verdict on one ``auto`` response to its memory."""
    from serve_app.ingress.routing.feedback import Feedback, feedback_items

    if principal.is_admin or not principal.tenant:
        raise OpenAIError(400, "feedback teaches one tenant's router; send it with that tenant's API key",
                          param="authorization")
    decision = catalog.feedback.decision(principal.tenant, body.id)
    if decision is None:
        raise OpenAIError(404, f"id: no model='auto' response {body.id!r} of tenant {principal.tenant!r} in the last "
                               f"{catalog.config.routing.decision_ttl_s:g} s; feedback applies to responses whose "
                               "atelier.routing.auto is true", param="id", code="response_not_found")
    if body.right_model is not None and body.right_model != BASE:
        known = {c.model_id for c in catalog.customizations(principal.tenant, catalog.config.catalog_miss_refresh_s)}
        if body.right_model not in known:
            raise OpenAIError(422, f"right_model: {body.right_model!r} is not one of your customizations; use 'base' "
                                   f"or one of {sorted(known)}", param="right_model")
    items = feedback_items(decision, body.right_model, body.rating)
    if not items:
        raise OpenAIError(422, "rating: a thumbs-down on a base answer does not say which customization was right; "
                               "send right_model instead", param="rating")
    size = 0
    for label, vote in items:
        size = catalog.feedback.add(Feedback(response_id=decision.id, tenant=principal.tenant, prompt=decision.prompt,
                                             label=label, vote=vote, chosen=decision.chosen, key_id=principal.key_id))
    return {"object": "feedback", "id": decision.id, "chosen": decision.chosen,
            "recorded": [{"label": label, "vote": vote} for label, vote in items], "memory_size": size}


def _expert_text(registry: Registry, tenant: str, expert_manifest, spec: dict) -> tuple[str, dict | None, int | None]:
    """(listing text, schema document or None, its version): the expert's description, features and question."""
    schema_name = spec.get("schema_name") or expert_manifest.name
    parts = [str(expert_manifest.metadata.get("description", ""))]
    schema, version = None, None
    try:
        manifest = registry.resolve(tenant, "schema", schema_name)
        schema, version = json.loads(registry.read_file(manifest, "schema.json")), manifest.version
        parts.append(schema.get("description", ""))
        parts.append(schema.get("target", {}).get("question", ""))
        for f in schema.get("features", []):
            parts.append(f"{f.get('name', '').replace('_', ' ')} {f.get('description', '')}")
    except (NotFound, ValueError):
        pass
    return " ".join(p for p in parts if p), schema, version


def _stored_examples(metadata: dict) -> list[str]:
    """An adapter's uploaded example prompts (validated at upload; anything else is ignored)."""
    try:
        return check_examples(metadata.get("examples"))
    except ValueError:
        return []
