"""The connectors job: schema + expert from the registry in, connectors out; two tenants in parallel."""

import json

import pytest

from cluster.registry import Registry
from tests.conftest import ROOT
from train_jobs.connectors import ConnectorsJob, build_parser, jobs_from_args, resolve_inputs

pytestmark = pytest.mark.ray
TITANIC = ROOT / "examples" / "schemas" / "titanic.json"
SMALL = {"synthetic_rows": 400, "train_questions": 48, "stage2_questions": 24, "eval_questions": 12,
         "enc_width": 32, "enc_heads": 4, "enc_head_hidden": 16, "dec_ffn": 16, "enc_epochs": 2, "dec_epochs": 2,
         "expert_epochs": 2, "num_slots": 3, "cache_dtype": "float32"}


def publish_tenant_expert(registry: Registry, tenant: str, name: str = "survival") -> None:
    """A tenant who published the titanic schema and an expert for it (what train_jobs.experts leaves)."""
    import tempfile
    from pathlib import Path

    from llamdex.expert import ExpertArch, ExpertSpec, build_expert, save_expert
    from llamdex.expert_spec import DPLedger

    registry.create_tenant(tenant)
    registry.publish(tenant, "schema", "titanic", {"schema.json": TITANIC.read_bytes()})
    arch = ExpertArch.from_schema(json.loads(TITANIC.read_text()), hidden_sizes=(8,))
    ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0.0, sample_rate=0.1, steps=1, epochs=1,
                      accountant="none")
    with tempfile.TemporaryDirectory() as tmp:
        save_expert(build_expert(arch), ExpertSpec.build(TITANIC.read_text(), arch, ledger), tmp)
        registry.publish(tenant, "expert", name, {p.name: p.read_bytes() for p in Path(tmp).iterdir()})


def test_jobs_carry_references_only(tmp_path):
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ConnectorsJob.model_validate({"tenant": "acme", "name": "survival", "data": "private.csv"})
    with pytest.raises(ValueError, match=r"unknown ConnectorsConfig fields \['epochs'\]"):
        ConnectorsJob(tenant="acme", name="survival", config={"epochs": 3})
    args = build_parser().parse_args(["--tenant", "acme", "--name", "survival", "--layer", "2",
                                      "--time-budget", "60", "--config", '{"enc_epochs": 3}'])
    assert jobs_from_args(args)[0].config == {"enc_epochs": 3, "layer": 2, "time_budget_s": 60.0}
    registry = Registry(str(tmp_path / "store"))
    registry.create_tenant("acme")
    with pytest.raises(ValueError, match="tenant 'acme' has no expert 'survival'; fix: publish it first"):
        resolve_inputs(registry, ConnectorsJob(tenant="acme", name="survival"))


def test_two_tenants_get_connectors_that_serve_their_expert(ray_session, tiny_model, tmp_path):
    from cluster.models import load_model
    from llamdex.insertion import load_bundle, predict
    from train_jobs.connectors import main

    store = tmp_path / "store"
    registry = Registry(str(store))
    for tenant in ("acme", "globex"):
        publish_tenant_expert(registry, tenant)
    jobs = [{"tenant": t, "name": "survival", "model": "tiny-random", "config": SMALL} for t in ("acme", "globex")]
    (tmp_path / "jobs.yaml").write_text(json.dumps(jobs))
    results = main(["--jobs", str(tmp_path / "jobs.yaml"), "--layer", "2", "--store", str(store),
                    "--storage-path", str(tmp_path / "ray")])
    assert sorted(r["ref"] for r in results) == ["acme/connectors/survival@1", "globex/connectors/survival@1"]
    manifest = registry.resolve("acme", "connectors", "survival")
    assert manifest.metadata["expert_version"] == 1 and manifest.metadata["layer"] == 2
    assert manifest.metadata["base_model"]["content_hash"] == tiny_model.content_hash
    spec = json.loads(registry.read_file(manifest, "connectors.json"))
    assert spec["layer"] == 2 and spec["num_slots"] == 3 and spec["tenant_schema"]["name"] == "titanic"
    model, tok = load_model(tiny_model)
    bundle = load_bundle(registry.materialize(registry.resolve("acme", "expert", "survival"), tmp_path / "c"),
                         registry.materialize(manifest, tmp_path / "c"), tiny_model.content_hash)
    answer = predict(model, tok, bundle, "A woman of 30 in first class. Did the passenger survive the sinking?")
    assert answer["label"] in ("no", "yes") and set(answer["features"]) >= {"age", "sex", "pclass"}
