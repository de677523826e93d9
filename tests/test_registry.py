"""Registry on a real local store: tenants, hashed keys, versioned artifacts, refusals."""

import json

import pytest
import torch
from safetensors.torch import save as st_save

from cluster.artifacts import ArtifactError
from cluster.registry import SYSTEM_TENANT, NotFound, Registry, RegistryError, hash_key

SCHEMA = {
    "name": "toy", "description": "toy table", "subject": "row",
    "features": [{"name": "age", "type": "int", "range": [0, 100]},
                 {"name": "color", "type": "category", "categories": ["red", "blue"]}],
    "target": {"name": "label", "question": "Is it positive?",
               "classes": [{"name": "no"}, {"name": "yes"}]},
}


def schema_files(**changes) -> dict[str, bytes]:
    return {"schema.json": json.dumps({**SCHEMA, **changes}).encode()}


@pytest.fixture(autouse=True)
def format_checks_only(monkeypatch):
    """These tests exercise storage and the registry's format checks with placeholder connectors
    files; the connectors' deep check (they must load) is tested with real ones in
    tests/llamdex/test_llamdex_connectors.py."""
    from cluster.artifacts import _DEEP_VALIDATORS, ArtifactKind

    monkeypatch.delitem(_DEEP_VALIDATORS, ArtifactKind.connectors, raising=False)


def connectors_files(value: float = 1.0) -> dict[str, bytes]:
    return {"connectors.json": b'{"layer": 1}',
            "connectors.safetensors": st_save({"w": torch.full((2, 2), value)})}


@pytest.mark.parametrize("bad", ["A", "a", "1abc", "acme_corp", "x" * 40, "acme corp", ""])
def test_tenant_ids_are_validated(registry, bad):
    with pytest.raises(RegistryError, match="tenant: .* fix: match"):
        registry.create_tenant(bad)


def test_tenant_lifecycle_and_keys_are_stored_hashed(registry, tmp_path):
    tenant, key = registry.create_tenant("acme", "Acme Inc.")
    assert tenant.id == "acme" and key.startswith("atl_") and len(key) > 40
    with pytest.raises(RegistryError, match="already exists"):
        registry.create_tenant("acme")
    with pytest.raises(RegistryError, match="reserved"):
        registry.create_tenant(SYSTEM_TENANT)
    principal = registry.authenticate(key)
    assert principal.tenant == "acme" and not principal.is_admin
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert key.encode() not in stored
    assert (tmp_path / "store" / "keys" / f"{hash_key(key)}.json").exists()
    admin = registry.issue_key(None, scope="admin")
    assert registry.authenticate(admin).is_admin
    assert {k.scope for k in registry.list_keys()} == {"tenant", "admin"}
    registry.revoke_key(principal.key_id)
    with pytest.raises(NotFound, match="unknown or revoked"):
        registry.authenticate(key)
    with pytest.raises(NotFound, match="not an Atelier API key"):
        registry.authenticate("sk-123")


def test_publish_versions_and_read_back(registry):
    registry.create_tenant("acme")
    r1 = registry.publish("acme", "schema", "toy", schema_files(), {"note": "first"})
    r2 = registry.publish("acme", "schema", "toy", schema_files(description="second"))
    assert (r1.version, r2.version) == (1, 2)
    assert registry.versions("acme", "schema", "toy") == [1, 2]
    latest = registry.resolve("acme", "schema", "toy")
    assert latest.version == 2 and json.loads(registry.read_file(latest, "schema.json"))["description"] == "second"
    assert registry.resolve("acme", "schema", "toy", 1).metadata == {"note": "first"}
    assert [str(m.ref) for m in registry.list_artifacts("acme")] == ["acme/schema/toy@2"]
    with pytest.raises(NotFound, match="no version 7"):
        registry.resolve("acme", "schema", "toy", 7)
    with pytest.raises(NotFound, match="no schema named 'other'"):
        registry.resolve("acme", "schema", "other")


def test_corruption_is_detected_on_read(registry, tmp_path):
    registry.create_tenant("acme")
    ref = registry.publish("acme", "connectors", "c", connectors_files())
    manifest = registry.resolve("acme", "connectors", "c")
    blob = next((tmp_path / "store").rglob("connectors.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        registry.read_file(manifest, "connectors.safetensors")
    assert ref.version == 1


@pytest.mark.parametrize("files, message", [
    ({"schema.json": b"{}", "model.bin": b"x"}, r"files: model.bin not allowed .* never accepted"),
    ({}, "missing schema.json"),
    ({"schema.json": b"[1, 2]"}, "top level must be a JSON object"),
    ({"schema.json": b"{not json"}, "not valid UTF-8 JSON"),
])
def test_bad_files_are_refused_before_anything_is_stored(registry, tmp_path, files, message):
    registry.create_tenant("acme")
    with pytest.raises(ArtifactError, match=message):
        registry.publish("acme", "schema", "toy", files)
    assert not (tmp_path / "store" / "artifacts").exists()


def test_bad_tensors_and_names_are_refused(registry):
    registry.create_tenant("acme")
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        registry.publish("acme", "connectors", "c", connectors_files(float("nan")))
    bad = {"connectors.json": b"{}", "connectors.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        registry.publish("acme", "connectors", "c", bad)
    with pytest.raises(ArtifactError, match="name: 'Bad Name'"):
        registry.publish("acme", "connectors", "Bad Name", connectors_files())
    with pytest.raises(ArtifactError, match="kind: unknown artifact kind 'model'"):
        registry.publish("acme", "model", "c", connectors_files())
    with pytest.raises(NotFound, match="tenant: 'ghost' does not exist"):
        registry.publish("ghost", "connectors", "c", connectors_files())


def test_schema_artifacts_are_deep_validated(registry):
    registry.create_tenant("acme")
    bad = dict(SCHEMA, features=[{"name": "age", "type": "int", "range": [5, 1]}])
    with pytest.raises(ValueError, match=r"features\[0\]\.range"):
        registry.publish("acme", "schema", "toy", {"schema.json": json.dumps(bad).encode()})


def test_system_namespace_and_materialize(registry, tmp_path):
    ref = registry.publish(SYSTEM_TENANT, "connectors", "pool-a", connectors_files())
    manifest = registry.resolve(SYSTEM_TENANT, "connectors", "pool-a")
    path = registry.materialize(manifest, tmp_path / "cache")
    assert (path / "connectors.safetensors").exists() and ref.tenant == SYSTEM_TENANT


def test_object_store_code_path_via_mock_filesystem(tmp_path):
    """The non-local branch (S3/GCS) exercised on pyarrow's in-memory filesystem."""
    import pyarrow.fs as pafs

    from cluster.storage import Storage

    store = Storage(uri="mock://", fs=pafs._MockFileSystem(), root="bucket/root")
    assert not store.is_local
    reg = Registry(store)
    reg.create_tenant("acme")
    assert reg.publish("acme", "schema", "toy", schema_files()).version == 1
    assert reg.publish("acme", "schema", "toy", schema_files()).version == 2
    assert store.create_exclusive("x/once.json", b"1") and not store.create_exclusive("x/once.json", b"2")
    assert reg.materialize(reg.resolve("acme", "schema", "toy"), tmp_path / "cache").joinpath("schema.json").exists()
