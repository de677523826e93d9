"""A live app with two tenants that each own every kind of artifact, for the isolation and
hostile-input tests.

``acme`` (the attacker, tenant A) and ``globex`` (the victim, tenant B) both publish a schema, a
Llamdex expert + connectors (really trained, seconds, on tiny-random) and adapters over HTTP;
``globex`` also owns an adapter with the *same name* as one of acme's. Every description globex
writes carries a canary string, so any response that shows it to someone else is a leak.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import httpx
from ray import serve

from cluster.registry import Registry
from tests.serve_fixtures import BASE_URL, PORT, make_peft_adapter, train_tiny_connectors, upload_dir
from tests.test_serve_experts import SCHEMA
from tests.test_serve_experts import Q as QUESTION  # noqa: F401  (re-exported for the test modules)

A, B = "acme", "globex"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def http() -> httpx.Client:
    return httpx.Client(base_url=BASE_URL, timeout=120)


_TRAINED: dict[str, tuple[Path, Path]] = {}


def trained_expert(tiny_model, work: Path) -> tuple[Path, Path]:
    """Expert + connectors for SCHEMA, trained once per session (shared by the test modules)."""
    key = str(tiny_model.path)
    if key not in _TRAINED:
        expert_dir, connectors_dir, _ = train_tiny_connectors(tiny_model, SCHEMA, work / "trained")
        _TRAINED[key] = (expert_dir, connectors_dir)
    return _TRAINED[key]


def listing_digest(store: Path, own_tenant: str | None = None) -> str:
    """SHA-256 over every path and byte of the registry's tenants, keys and artifacts (locks and
    temp files excluded): equal digests = byte-identical registry. ``own_tenant``: also exclude that
    tenant's own ``model="auto"`` decisions (``routing/<tenant>/``), which its auto requests write."""
    h = hashlib.sha256()
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if rel.startswith("locks") or p.name.startswith(".") or (
                own_tenant and (rel in ("routing", f"routing/{own_tenant}") or rel.startswith(f"routing/{own_tenant}/"))):
            continue
        h.update(rel.encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def deploy(app_name: str, work: Path, tiny_model, **overrides) -> dict:
    """Deploy the app on tiny-random and populate both tenants over HTTP; returns the keys,
    artifact names, canaries and paths the tests need."""
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    expert_dir, connectors_dir = trained_expert(tiny_model, work)
    store = work / "store"
    registry = Registry(str(store))
    _, key_a = registry.create_tenant(A)
    _, key_b = registry.create_tenant(B)
    admin = registry.issue_key(None, scope="admin")
    config = {"pools": [{"name": "small", "model": "tiny-random", "num_cpus": 0.5, "max_batch_size": 8,
                         "batch_wait_ms": 20, "max_new_tokens": 32, "max_prompt_tokens": 256,
                         "bank_poll_s": 1.0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
              "rate_limit_rpm": 1_000_000, "max_upload_mb": 2, **overrides}
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(load_app_config(config), str(store)), name=app_name, route_prefix="/")
    canary = f"CANARY-{B}-{uuid.uuid4().hex[:12]}"
    adapters = {(A, "pirate"): make_peft_adapter(tiny_model.path, work / "a-pirate", 1),
                (B, "pirate"): make_peft_adapter(tiny_model.path, work / "b-pirate", 3),
                (B, "payroll"): make_peft_adapter(tiny_model.path, work / "b-payroll", 8)}
    with http() as c:
        for tenant, key in ((A, key_a), (B, key_b)):
            schema = {**SCHEMA, "description": f"{canary} ledger of {tenant}" if tenant == B else SCHEMA["description"]}
            r = c.post(f"/v1/tenants/{tenant}/schemas/titanic", headers=bearer(key), json=schema)
            assert r.status_code == 201, r.text
            r = upload_dir(c, key, tenant, "experts", "survival", expert_dir,
                           description=f"{canary} survival" if tenant == B else "titanic survival")
            assert r.status_code == 201, r.text
            r = upload_dir(c, admin, tenant, "connectors", "survival", connectors_dir)
            assert r.status_code == 201, r.text
        for (tenant, name), path in adapters.items():
            key = key_a if tenant == A else key_b
            desc = f"{canary} {name} adapter" if tenant == B else "pirate talk: ships, sailing, treasure and the sea"
            r = upload_dir(c, key, tenant, "adapters", name, path, description=desc)
            assert r.status_code == 201, r.text
    return {"registry": registry, "store": store, "keys": {A: key_a, B: key_b, "admin": admin},
            "canary": canary, "adapters": adapters, "expert_dir": expert_dir, "connectors_dir": connectors_dir,
            "model": tiny_model, "victim_names": {"schema": ["titanic"], "expert": ["survival"],
                                                  "connectors": ["survival"], "adapter": ["pirate", "payroll"]}}


def openapi() -> dict:
    with http() as c:
        r = c.get("/openapi.json")
        r.raise_for_status()
        return r.json()


def dump(obj) -> str:
    return json.dumps(obj, sort_keys=True)
