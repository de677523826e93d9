"""The DP experts job: two tenants as two parallel Ray Train runs, published with their ledgers."""

import json

import pandas as pd
import pytest

from cluster.registry import Registry
from llamdex.codec import FeatureCodec
from llamdex.datasets import load_paper_dataset
from llamdex.expert import load_expert, predict_proba
from tests.conftest import ROOT
from train_jobs.experts import ExpertJob, load_private_table

pytestmark = pytest.mark.ray
TITANIC = str(ROOT / "examples" / "schemas" / "titanic.json")


def test_job_validation_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="exactly one of data"):
        ExpertJob(tenant="a1", name="x", schema_path=TITANIC)
    assert ExpertJob(tenant="a1", name="x", schema_path=TITANIC, paper_dataset="titanic",
                     epsilon=float("inf")).epsilon is None
    bad = tmp_path / "private.csv"
    pd.DataFrame({"age": [3.0]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="data: .* lacks columns"):
        load_private_table(ExpertJob(tenant="a1", name="x", schema_path=TITANIC, data=str(bad)))


def test_two_tenants_train_in_parallel_and_publish(ray_session, tmp_path):
    from train_jobs.experts import main

    store = tmp_path / "store"
    jobs = [{"tenant": "acme", "name": "survival", "schema_path": TITANIC, "paper_dataset": "titanic",
             "epsilon": 1.0, "epochs": 3},
            {"tenant": "globex", "name": "survival", "schema_path": TITANIC, "paper_dataset": "titanic",
             "epsilon": None, "epochs": 3}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    results = main(["--jobs", str(tmp_path / "jobs.json"), "--store", str(store), "--out", str(tmp_path / "out")])
    by_tenant = {r["tenant"]: r for r in results}
    dp, plain = by_tenant["acme"]["ledger"], by_tenant["globex"]["ledger"]
    assert dp["mechanism"] == "dp-sgd" and 0 < dp["epsilon"] <= 1.0 and dp["noise_multiplier"] > 0
    assert dp["delta"] == 1e-4 and dp["steps"] > 0 and dp["accountant"] in ("prv", "rdp")  # 709 rows
    assert dp["secure_rng"] is True and dp["noise_rng"] == "os.urandom"
    assert plain["mechanism"] == "none" and plain["epsilon"] is None
    assert all(set(r) == {"tenant", "name", "ref", "out_dir", "ledger", "seconds"} for r in results)  # no stats
    registry = Registry(str(store))
    for tenant in ("acme", "globex"):
        manifest = registry.resolve(tenant, "expert", "survival")
        spec = json.loads(registry.read_file(manifest, "expert.json"))
        assert spec["schema_name"] == "titanic" and registry.resolve(tenant, "schema", "titanic").version == 1
        assert set(manifest.metadata) == {"description", "schema_sha256", "dp", "epsilon", "delta", "secure_rng"}
    # the non-DP expert learned (checked here, on the held-out split, not published by the job)
    model, _ = load_expert(registry.materialize(registry.resolve("globex", "expert", "survival"), tmp_path / "m"))
    schema, _, test = load_paper_dataset("titanic", ROOT / "examples" / "datasets", TITANIC)
    x = FeatureCodec(schema).encode(test[[f.name for f in schema.features]])
    assert (predict_proba(model, x).argmax(1) == test["survived"].to_numpy()).mean() > 0.7  # majority is 0.62
    assert json.loads(registry.read_file(registry.resolve("acme", "expert", "survival"), "expert.json"))[
        "dp"]["epsilon"] == dp["epsilon"]
