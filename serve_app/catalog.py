"""What a caller may use, and where it runs: the router's view of the registry.

A request's ``model`` is ``base``, ``<tenant>/<name>`` (an adapter in a pool's bank, or an
expert with published connectors) or ``auto``. :class:`Catalog` lists these per caller, resolves
a name to a :class:`Target` (kind, pool, multiplexed expert key) and implements ``auto``.

An expert is servable on the torch pools whose base model has the content hash its connectors
were trained for; its listing and its resolved target carry its version's DP ledger
(``privacy``, read from expert.json by :func:`cluster.ledger.expert_ledger`); its multiplexed key ``<tenant>/<name>@e<expert version>.c<connectors version>``
(:mod:`serve_app.experts`) changes whenever either artifact is re-published.

* **which customization** — TF-IDF cosine similarity (scikit-learn) between the prompt and
  each candidate's text: an adapter's description, an expert's schema description, feature
  names/descriptions and target question. The best candidate wins if its similarity is at
  least ``auto_min_similarity``; otherwise ``base``. The response reports every score.
* **which pool** — a latency hint picks the lowest ``latency_tier`` among pools that can
  serve the target, a cost hint the lowest ``cost_tier``; otherwise the customization's own
  pool or the default pool.

Listings are cached for ``catalog_ttl_s`` and invalidated when the router itself publishes. A
request naming a model the cached listing lacks (or has without a pool yet) re-reads the
registry if the listing is older than ``catalog_miss_refresh_s``, so artifacts published by
jobs straight into the registry are served within that bound instead of the TTL.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from cluster.artifacts import NAME_PATTERN
from cluster.ledger import expert_ledger
from cluster.models import ModelError, resolve_model
from cluster.registry import SYSTEM_TENANT, TENANT_PATTERN, NotFound, Principal, Registry
from serve_app.config import AppConfig, PoolConfig
from serve_app.openai_api import OpenAIError, RoutingHints


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
            found.append(Customization(model_id, tenant, m.name, "adapter", m.version, pools,
                                       str(m.metadata.get("description", "")),
                                       {"in_bank": bool(pools)}))
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
            found.append(Customization(f"{tenant}/{m.name}", tenant, m.name, "expert", expert.version,
                                       pools, _expert_text(self.registry, tenant, expert, spec), extra))
        with self._lock:
            self._cache[tenant] = (time.monotonic(), found)
        return found

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
        """Torch pools whose base model the connectors were trained for."""
        hashes = self.pool_model_hashes()
        return tuple(p.name for p in self.config.pools if p.engine == "torch"
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
            pool = self._pick_pool([p.name for p in self.config.pools], hints)
            return Target("base", "base", principal.tenant, pool, routing=_hint_note(hints, pool))
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
            running = {p.name: p.model for p in self.config.pools if p.engine == "torch"}
            raise OpenAIError(422, f"{c.model_id}: its connectors (version {c.extra['connectors_version']}) were "
                                   f"trained for base model {c.extra.get('base_model')!r}, but no torch pool runs "
                                   f"that model (pools: {running}); fix: train connectors against a pool's base "
                                   "model (the connectors job) or add a pool running that model",
                              param="model", code="model_not_servable")
        if not c.pools:
            raise OpenAIError(503, f"{c.model_id} is uploaded but not in any pool's adapter bank yet; retry "
                                   "after the bank job (or the automatic projection) publishes", type_="unavailable")
        pool = self._pick_pool(list(c.pools), hints)
        routing = dict(reason or {})
        routing.update(_hint_note(hints, pool) or {})
        return Target(c.model_id, c.kind, c.tenant, pool, adapter=c.model_id if c.kind == "adapter" else None,
                      expert_key=c.expert_key, routing=routing or None,
                      expert_version=c.version if c.kind == "expert" else None, privacy=c.extra.get("privacy"))

    def _pick_pool(self, candidates: list[str], hints: RoutingHints | None) -> str:
        pools = [self.config.pool(n) for n in candidates]
        if hints and hints.pool:
            if hints.pool not in candidates:
                raise OpenAIError(400, f"atelier.pool {hints.pool!r} cannot serve this model; choose one of "
                                       f"{candidates}", param="atelier.pool")
            return hints.pool
        if hints and hints.latency == "low":
            return min(pools, key=lambda p: (p.latency_tier, p.cost_tier)).name
        if hints and hints.cost == "low":
            return min(pools, key=lambda p: (p.cost_tier, p.latency_tier)).name
        default = self.config.pool().name
        return default if default in candidates else candidates[0]

    def _auto(self, principal: Principal, prompt: str, hints: RoutingHints | None) -> Target:
        candidates = [c for c in self.visible(principal) if c.pools and c.description.strip()]
        scores = similarity_scores(prompt, [c.description for c in candidates])
        ranked = sorted(zip(candidates, scores, strict=True), key=lambda cs: -cs[1])
        table = [{"model": c.model_id, "kind": c.kind, "similarity": round(s, 4)} for c, s in ranked[:5]]
        threshold = self.config.auto_min_similarity
        if ranked and ranked[0][1] >= threshold:
            best, score = ranked[0]
            reason = {"auto": True, "chosen": best.model_id, "method": "tfidf-cosine(prompt, description)",
                      "similarity": round(score, 4), "threshold": threshold, "candidates": table}
            return self._target(best, hints, reason)
        pool = self._pick_pool([p.name for p in self.config.pools], hints)
        reason = {"auto": True, "chosen": "base", "method": "tfidf-cosine(prompt, description)",
                  "why": "no customization reached the similarity threshold" if ranked else
                         "the caller has no servable customization", "threshold": threshold, "candidates": table}
        reason.update(_hint_note(hints, pool) or {})
        return Target("base", "base", principal.tenant, pool, routing=reason)


def similarity_scores(prompt: str, documents: list[str]) -> list[float]:
    """TF-IDF cosine similarity of ``prompt`` to each document (0 when there are none)."""
    if not documents:
        return []
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    vec = TfidfVectorizer(stop_words="english", sublinear_tf=True, ngram_range=(1, 2))
    try:
        matrix = vec.fit_transform(documents + [prompt])
    except ValueError:  # empty vocabulary (e.g. only stop words)
        return [0.0] * len(documents)
    return cosine_similarity(matrix[-1], matrix[:-1])[0].tolist()


def _hint_note(hints: RoutingHints | None, pool: str) -> dict | None:
    if not hints or not (hints.latency or hints.cost or hints.pool):
        return None
    return {"pool": pool, "hints": hints.model_dump(exclude_none=True),
            "pool_choice": "lowest latency_tier" if hints.latency == "low" else
                           "lowest cost_tier" if hints.cost == "low" else "as requested"}


def _expert_text(registry: Registry, tenant: str, expert_manifest, spec: dict) -> str:
    """Text describing an expert for ``auto``: its schema's description, features and question."""
    schema_name = spec.get("schema_name") or expert_manifest.name
    parts = [str(expert_manifest.metadata.get("description", ""))]
    try:
        schema = json.loads(registry.read_file(registry.resolve(tenant, "schema", schema_name), "schema.json"))
        parts.append(schema.get("description", ""))
        parts.append(schema.get("target", {}).get("question", ""))
        for f in schema.get("features", []):
            parts.append(f"{f.get('name', '').replace('_', ' ')} {f.get('description', '')}")
    except NotFound:
        pass
    return " ".join(p for p in parts if p)


def pools_by_name(config: AppConfig) -> dict[str, PoolConfig]:
    return {p.name: p for p in config.pools}
