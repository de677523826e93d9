"""The `atelier` CLI end to end in-process: tenants, keys, artifacts, schemas, models, errors."""

import json
from pathlib import Path

import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv, code: int = 0) -> str:
    try:
        main(list(argv))
        exit_code = 0
    except SystemExit as exc:
        exit_code = exc.code or 0
    out, err = capsys.readouterr()
    assert exit_code == code, out + err
    return out if code == 0 else err


@pytest.fixture()
def store(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def test_tenant_key_artifact_flow(capsys, store, tmp_path):
    created = json.loads(run(capsys, "tenants", "create", "acme"))
    assert created["tenant"]["id"] == "acme" and created["api_key"].startswith("atl_")
    assert "acme" in run(capsys, "tenants", "list")
    run(capsys, "tenants", "create", "acme", code=2)
    admin = run(capsys, "keys", "issue", "--admin")
    assert '"api_key": "atl_' in admin
    schema = ROOT / "examples" / "schemas" / "titanic.json"
    assert "acme/schema/titanic@1" in run(capsys, "artifacts", "publish", "--tenant", "acme", "--kind", "schema",
                                          "--name", "titanic", str(schema))
    listed = json.loads(run(capsys, "artifacts", "list", "--tenant", "acme"))
    assert listed[0]["ref"] == "acme/schema/titanic@1"
    shown = json.loads(run(capsys, "artifacts", "show", "--tenant", "acme", "--kind", "schema", "--name", "titanic"))
    assert shown["version"] == 1 and "schema.json" in shown["files"]
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (bad / "adapter_config.json").write_text("{}")
    err = run(capsys, "artifacts", "publish", "--tenant", "acme", "--kind", "adapter", "--name", "a", str(bad), code=2)
    assert "adapter_model.bin not allowed" in err
    err = run(capsys, "artifacts", "show", "--tenant", "acme", "--kind", "schema", "--name", "nope", code=3)
    assert "no schema named 'nope'" in err


def test_schema_validate_and_model_info(capsys, tmp_path, atelier_home):
    for name in ("titanic", "wine", "nursery", "bank"):
        out = run(capsys, "schema", "validate", str(ROOT / "examples" / "schemas" / f"{name}.json"))
        assert "valid schema" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "features": [], "target": {}}))
    assert "features" in run(capsys, "schema", "validate", str(bad), code=2)
    info = json.loads(run(capsys, "models", "pull", "tiny-random"))
    assert info["id"] == "tiny-random" and len(info["content_hash"]) == 64
    assert "ATELIER_STORE" in run(capsys, "settings")


def test_connectors_train_wrapper_refuses_missing_expert(capsys, store):
    run(capsys, "tenants", "create", "acme")
    err = run(capsys, "connectors", "train", "--tenant", "acme", "--name", "survival", code=2)
    assert "tenant 'acme' has no expert 'survival'" in err
    assert "--time-budget" in run(capsys, "connectors", "train", "--help", code=0)
