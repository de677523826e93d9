"""Nothing about the private rows leaves the experts job outside ε.

The job is run (its tenant-side function, no Ray: the Ray worker calls the same function with
``ray.train.report``) on datasets that differ, and *everything* it lets out is compared: the
per-epoch reports (what Ray Train and the dashboard get), the return value (what reaches the
driver), the registry manifest's metadata and file list, and expert.json. Only the weights (and
their hash) may differ; the DP ledger may differ only when the row count differs (sample rate,
steps, δ are functions of n). A field computed from the rows outside the DP mechanism (training
accuracy, loss, a label rate) makes these comparisons fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.registry import Registry
from llamdex.datasets import load_paper_dataset
from llamdex.schema import load_schema
from tests.conftest import ROOT
from train_jobs.experts import ExpertJob, publish, train_and_save

TITANIC = ROOT / "examples" / "schemas" / "titanic.json"
WEIGHTS_ONLY = ("weights_sha256",)


@pytest.fixture(scope="module")
def private_csvs(tmp_path_factory) -> dict[str, Path]:
    """Three private tables: A and B have the same size but share no row and B's labels are
    flipped; C is larger."""
    schema = load_schema(TITANIC)
    _, train, _ = load_paper_dataset("titanic", ROOT / "examples" / "datasets", schema)
    names = [c.name for c in schema.target.classes]
    out = tmp_path_factory.mktemp("private")

    def write(name: str, frame, flip: bool = False) -> Path:
        frame = frame.copy()
        frame["survived"] = [names[(int(v) + flip) % 2] for v in frame["survived"]]
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        return path

    return {"a": write("a", train.iloc[:300]), "b": write("b", train.iloc[300:600], flip=True),
            "c": write("c", train.iloc[:450])}


def run_job(csv: Path, tmp: Path, **job_fields) -> dict:
    """Everything the job lets out of the tenant's worker, and what it printed."""
    job = ExpertJob(tenant="acme", name="survival", schema_path=str(TITANIC), data=str(csv), epsilon=1.0,
                    epochs=2, hidden_sizes=[16], accountant="rdp", **job_fields)
    reports: list[dict] = []
    out = train_and_save(job, tmp / "expert", reports.append)
    store = tmp / "store"
    ref = publish(job, out, str(store))
    registry = Registry(str(store))
    manifest = registry.resolve("acme", "expert", "survival")
    spec = json.loads(registry.read_file(manifest, "expert.json"))
    return {"reports": reports, "returned": {k: v for k, v in out.items() if k != "out_dir"},
            "metadata": manifest.metadata, "files": sorted(manifest.files), "ref": ref,
            "spec": {k: v for k, v in spec.items() if k not in WEIGHTS_ONLY}}


def without_ledger(published: dict) -> dict:
    out = json.loads(json.dumps(published))
    out["returned"].pop("ledger")
    for report in out["reports"]:  # steps and ε so far: the ledger's quantities, epoch by epoch
        report.pop("steps")
        report.pop("epsilon_spent")
    out["spec"].pop("dp")
    for key in ("epsilon", "delta"):  # the ledger's headline numbers, copied into the metadata
        out["metadata"].pop(key)
    return out


def test_same_size_datasets_publish_identical_everything_but_weights(private_csvs, tmp_path, capsys):
    a = run_job(private_csvs["a"], tmp_path / "a")
    printed_a = capsys.readouterr().out
    b = run_job(private_csvs["b"], tmp_path / "b")
    printed_b = capsys.readouterr().out
    assert a == b  # reports, return value, metadata, expert.json (ledger included): no trace of the rows
    assert a["returned"]["ledger"]["secure_rng"] is True and a["metadata"]["secure_rng"] is True
    assert a["metadata"]["dp"] is True and "rows" not in a["metadata"] and "rows" not in a["returned"]
    assert a["metadata"]["delta"] == 1e-4  # 300 rows: the largest power of ten <= 1/(10 n)
    assert [r["epoch"] for r in a["reports"]] == [1, 2] and "loss" not in json.dumps(a["reports"])
    assert 0 < a["reports"][-1]["epsilon_spent"] <= 1.0
    # the private statistics are printed on the tenant's side only, and they do differ
    assert "PRIVATE, not DP, never published" in printed_a and "accuracy" in printed_a
    # (accuracy and per-epoch losses together: two datasets' accuracies alone can coincide, 0.7833 = 235/300)
    assert printed_a.split("accuracy is ")[1].split("\n")[0] != printed_b.split("accuracy is ")[1].split("\n")[0]


def test_a_different_size_changes_only_the_ledger_unless_the_tenant_publishes_it(private_csvs, tmp_path):
    a = run_job(private_csvs["a"], tmp_path / "a")
    c = run_job(private_csvs["c"], tmp_path / "c")
    assert without_ledger(a) == without_ledger(c)
    assert a["returned"]["ledger"]["sample_rate"] != c["returned"]["ledger"]["sample_rate"]
    agreed = run_job(private_csvs["c"], tmp_path / "agreed", publish_row_count=True)
    assert agreed["metadata"]["rows"] == agreed["returned"]["rows"] == 450


def test_the_reproducibility_seed_is_recorded_as_not_secure(private_csvs, tmp_path):
    with pytest.warns(UserWarning, match="reproducibility mode"):
        out = run_job(private_csvs["a"], tmp_path / "seeded", reproducible_seed=3)
    assert out["spec"]["dp"]["secure_rng"] is False and out["spec"]["dp"]["noise_rng"] == "fixed-seed"
    assert out["metadata"]["secure_rng"] is False


def test_job_refuses_the_old_seed_field_and_a_large_delta(private_csvs, tmp_path):
    with pytest.raises(ValueError, match="seed: no longer accepted.*reproducible_seed"):
        ExpertJob(tenant="acme", name="x", schema_path=str(TITANIC), data="x.csv", seed=0)
    job = ExpertJob(tenant="acme", name="x", schema_path=str(TITANIC), data=str(private_csvs["a"]), delta=0.01,
                    epochs=1, hidden_sizes=[4])
    with pytest.raises(ValueError, match=r"delta: 0.01 >= 1/n = 1/300"):
        train_and_save(job, tmp_path / "x", lambda r: None)
