"""The DP experts job: two tenants as two parallel Ray Train runs, published with their ledgers."""

import json

import pandas as pd
import pytest

from cluster.registry import Registry
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
    assert dp["delta"] == 0.001 and dp["steps"] > 0 and dp["accountant"] in ("prv", "rdp")
    assert plain["mechanism"] == "none" and plain["epsilon"] is None
    assert by_tenant["globex"]["train_accuracy"] > 0.7  # titanic majority class is 0.62
    registry = Registry(str(store))
    for tenant in ("acme", "globex"):
        manifest = registry.resolve(tenant, "expert", "survival")
        spec = json.loads(registry.read_file(manifest, "expert.json"))
        assert spec["schema_name"] == "titanic" and registry.resolve(tenant, "schema", "titanic").version == 1
    assert json.loads(registry.read_file(registry.resolve("acme", "expert", "survival"), "expert.json"))[
        "dp"]["epsilon"] == dp["epsilon"]
