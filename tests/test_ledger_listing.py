"""cluster.ledger: the ledger listings show comes from expert.json (not the free metadata), old
ledgers still read, and `atelier artifacts list` shows it for experts."""

from __future__ import annotations

import json

import torch

from cli.main import main
from cluster.ledger import expert_ledger
from cluster.registry import Registry
from llamdex.expert import DPLedger, ExpertArch, ExpertSpec, build_expert, save_expert
from tests.conftest import ROOT

TITANIC = ROOT / "examples" / "schemas" / "titanic.json"
DP = DPLedger(mechanism="dp-sgd", epsilon=0.98, target_epsilon=1.0, delta=1e-4, noise_multiplier=1.1,
              sample_rate=0.09, steps=110, epochs=10, max_grad_norm=1.0, accountant="prv", secure_rng=True,
              noise_rng="os.urandom")


def _publish(store, tmp_path, ledger_json=None) -> Registry:
    registry = Registry(str(store))
    registry.create_tenant("acme")
    registry.publish("acme", "schema", "titanic", {"schema.json": TITANIC.read_bytes()})
    arch = ExpertArch.from_schema(str(TITANIC), hidden_sizes=(4,))
    torch.manual_seed(0)
    save_expert(build_expert(arch), ExpertSpec.build(str(TITANIC), arch, DP), tmp_path / "e")
    files = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    if ledger_json is not None:
        spec = json.loads(files["expert.json"])
        spec["dp"] = ledger_json
        files["expert.json"] = json.dumps(spec).encode()
    # metadata that lies about epsilon: listings must not believe it
    registry.publish("acme", "expert", "survival", files, {"epsilon": 0.01, "description": "x"})
    return registry


def test_ledger_comes_from_expert_json_not_metadata(tmp_path):
    registry = _publish(tmp_path / "store", tmp_path)
    manifest = registry.resolve("acme", "expert", "survival")
    view = expert_ledger(registry, manifest)
    assert view == json.loads(json.dumps(DP.public_view())) and view["epsilon"] == 0.98 and view["dp"] is True


def test_ledger_of_an_expert_published_before_secure_rng(tmp_path):
    legacy = DP.model_dump(exclude={"secure_rng", "noise_rng"}) | {"secure_mode": False}
    registry = _publish(tmp_path / "store", tmp_path, ledger_json=legacy)
    view = expert_ledger(registry, registry.resolve("acme", "expert", "survival"))
    assert view["secure_rng"] is False and view["noise_rng"] is None and view["epsilon"] == 0.98


def test_cli_listing_shows_the_ledger(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATELIER_STORE", str(tmp_path / "store"))
    _publish(tmp_path / "store", tmp_path)
    main(["artifacts", "list", "--tenant", "acme"])
    listed = {row["ref"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed["acme/expert/survival@1"]["privacy"]["epsilon"] == 0.98
    assert "privacy" not in listed["acme/schema/titanic@1"]


def test_router_lists_the_ledger_over_http(tiny_model, tmp_path):
    """The router's FastAPI app in-process (no Ray): GET /v1/models and the artifact listing show
    the ledger of a DP expert with real (tiny) connectors. Predict/chat: tests/test_serve_experts.py."""
    from fastapi.testclient import TestClient

    from serve_app.config import load_app_config
    from serve_app.ingress.catalog import Catalog
    from serve_app.ingress.router import create_api
    from serve_app.ingress.state import RouterState, set_state
    from tests.serve_fixtures import train_tiny_connectors
    from tests.test_serve_experts import SCHEMA

    _, connectors_dir, _ = train_tiny_connectors(tiny_model, SCHEMA, tmp_path / "trained")
    registry = Registry(str(tmp_path / "store"))
    _, key = registry.create_tenant("acme")
    registry.publish("acme", "schema", "titanic", {"schema.json": json.dumps(SCHEMA).encode()})
    arch = ExpertArch.from_schema(SCHEMA, hidden_sizes=(4,))
    save_expert(build_expert(arch), ExpertSpec.build(SCHEMA, arch, DP), tmp_path / "dp")
    registry.publish("acme", "expert", "survival", {p.name: p.read_bytes() for p in (tmp_path / "dp").iterdir()},
                     {"epsilon": 0.01})
    registry.publish("acme", "connectors", "survival", {p.name: p.read_bytes() for p in connectors_dir.iterdir()})
    config = load_app_config({"pools": [{"name": "small", "model": "tiny-random"}]})
    set_state(RouterState(config=config, registry=registry, catalog=Catalog(registry, config), pools={}))
    want = json.loads(json.dumps(DP.public_view()))
    with TestClient(create_api()) as client:
        headers = {"Authorization": f"Bearer {key}"}
        cards = {c["id"]: c for c in client.get("/v1/models", headers=headers).json()["data"]}
        listing = client.get("/v1/tenants/acme/artifacts", headers=headers).json()["data"]
    assert cards["acme/survival"]["atelier"]["privacy"] == want and cards["acme/survival"]["atelier"]["expert_version"] == 1
    assert [a["privacy"] for a in listing if a["kind"] == "expert"] == [want]
