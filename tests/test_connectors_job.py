"""The connectors job: schema + expert from the registry in, connectors out; two tenants in parallel."""

import json

import pytest

from bench.resume import publish_untrained_expert
from cluster.registry import Registry
from tests.conftest import ROOT
from train_jobs.connectors import ConnectorsJob, build_parser, jobs_from_args, resolve_inputs

pytestmark = pytest.mark.ray
SMALL = {"synthetic_rows": 400, "train_questions": 48, "stage2_questions": 24, "eval_questions": 12,
         "enc_width": 32, "enc_heads": 4, "enc_head_hidden": 16, "dec_ffn": 16, "enc_epochs": 2, "dec_epochs": 2,
         "expert_epochs": 2, "num_slots": 3, "cache_dtype": "float32"}


def publish_tenant_expert(registry: Registry, tenant: str, name: str = "survival") -> None:
    """A tenant who published the titanic schema and an expert for it (what train_jobs.experts leaves)."""
    publish_untrained_expert(registry, tenant, name, hidden_sizes=(8,))


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
    from llamdex.provenance import source_fingerprint, stale_reason
    assert stale_reason(manifest.metadata, code=source_fingerprint(), expert_version=1) is None  # the demo reuses it
    spec = json.loads(registry.read_file(manifest, "connectors.json"))
    assert spec["layer"] == 2 and spec["num_slots"] == 3 and spec["tenant_schema"]["name"] == "titanic"
    model, tok = load_model(tiny_model)
    bundle = load_bundle(registry.materialize(registry.resolve("acme", "expert", "survival"), tmp_path / "c"),
                         registry.materialize(manifest, tmp_path / "c"), tiny_model.content_hash)
    answer = predict(model, tok, bundle, "A woman of 30 in first class. Did the passenger survive the sinking?")
    assert answer["label"] in ("no", "yes") and set(answer["features"]) >= {"age", "sex", "pclass"}


def test_a_killed_job_resumes_from_its_stage_one_checkpoint(ray_session, tiny_model, tmp_path):
    """SIGKILL the job (a real driver process on this cluster) once stage 1's checkpoint is stored;
    the same job submitted again trains no encoder, publishes connectors whose encoder is the
    checkpoint's, and removes the finished run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    from train_jobs.connectors import main

    store, storage = tmp_path / "store", tmp_path / "ray"
    registry = Registry(str(store))
    publish_tenant_expert(registry, "acme")
    slow_stage2 = {**SMALL, "enc_epochs": 3, "dec_epochs": 25}  # room to kill between the stages
    argv = ["--tenant", "acme", "--name", "survival", "--model", "tiny-random", "--layer", "2",
            "--config", json.dumps(slow_stage2), "--store", str(store), "--storage-path", str(storage)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "train_jobs.connectors", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def registered() -> bool:  # Ray Train's controller has recorded the checkpoint (what a new run restores)
        return any("encoder" in p.read_text() for p in storage.glob("*/checkpoint_manager_snapshot.json"))

    deadline = time.monotonic() + 300
    while not registered() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = list(storage.glob("*/checkpoint*/encoder.safetensors"))
    assert len(saved) == 1, "the job ended before stage 1 was checkpointed"
    assert not registry.versions("acme", "connectors", "survival"), "the kill landed after publishing"
    encoder_state = load_file(saved[0])
    [row] = main(argv)
    assert row["resumed_from"] == "encoder" and row["stage1_seconds_saved"] > 0
    assert row["ref"] == "acme/connectors/survival@1" and not list(storage.iterdir())
    published = load_file(registry.materialize(registry.resolve("acme", "connectors", "survival"), tmp_path / "c")
                          / "connectors.safetensors")
    for key, value in encoder_state.items():
        assert torch.equal(published[f"encoder.{key}"], value), key
