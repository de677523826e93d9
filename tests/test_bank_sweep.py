"""The Ray Tune bank sweep on real PEFT adapters for the tiny model: grid, choice, plot, publish."""

import json

import pytest

from cluster.banks import read_bank
from cluster.registry import Registry
from tests.serve_fixtures import make_peft_adapter
from train_jobs.bank_sweep import choose

pytestmark = pytest.mark.ray


def test_choose_prefers_the_smallest_bank_under_budget():
    rows = [{"rank": 8, "clusters": 1, "method": "full", "mean_error": 0.2, "bank_params": 900},
            {"rank": 4, "clusters": 1, "method": "full", "mean_error": 0.45, "bank_params": 500},
            {"rank": 2, "clusters": 1, "method": "diag", "mean_error": 0.7, "bank_params": 100}]
    assert choose(rows, 0.5).rank == 4
    assert choose(rows, 0.1) is None


def test_sweep_publishes_the_chosen_bank(ray_session, tiny_model, tmp_path, monkeypatch):
    from train_jobs.bank_sweep import main

    adapters = tmp_path / "adapters"
    for i in range(6):
        make_peft_adapter(tiny_model.path, adapters / f"t{i}", seed=i)
    store = tmp_path / "store"
    report = main(["--adapters", str(adapters), "--model", "tiny-random", "--ranks", "4,8", "--clusters", "1,2",
                   "--methods", "full,diag", "--budget", "0.9", "--publish", "--bank", "small", "--store", str(store),
                   "--out", str(tmp_path / "out")])
    assert len(report["trials"]) == 8
    assert {(t["rank"], t["clusters"], t["method"]) for t in report["trials"]} == {
        (r, k, m) for r in (4, 8) for k in (1, 2) for m in ("full", "diag")}
    for t in report["trials"]:
        assert 0 <= t["mean_error"] <= t["max_error"] <= 1 and 0 < t["param_ratio"]
    choice = report["choice"]
    eligible = [t for t in report["trials"] if t["mean_error"] <= 0.9]
    assert choice["bank_params"] == min(t["bank_params"] for t in eligible)
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["choice"] == choice
    bank, version = read_bank(Registry(str(store)), "small")
    assert version == report["published_version"] == 1
    assert (bank.rank, bank.num_clusters, bank.method) == (choice["rank"], choice["clusters"], choice["method"])
    assert bank.base_model_hash == tiny_model.content_hash and len(bank.adapters) == 6
