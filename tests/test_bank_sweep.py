"""The Ray Tune bank sweep on real PEFT adapters for the tiny model: grid, choice within the budget,
plot, publish; and a refit of a served bank that keeps the uploads made while it ran."""

import json

import pytest
import torch

from cluster.banks import add_to_bank, read_bank
from cluster.registry import Registry
from compression.selection import choose
from tests.serve_fixtures import make_peft_adapter

pytestmark = pytest.mark.ray


def test_choose_prefers_the_smallest_served_bank():
    rows = [{"rank": 8, "clusters": 1, "method": "full", "mean_error": 0.01, "bank_params": 900, "exact_adapters": 0},
            {"rank": 4, "clusters": 1, "method": "full", "mean_error": 0.02, "bank_params": 500, "exact_adapters": 2},
            {"rank": 2, "clusters": 1, "method": "diag", "mean_error": 0.0, "bank_params": 500, "exact_adapters": 5}]
    assert (choose(rows).rank, choose(rows).method) == (2, "diag")  # equal size: the lower error
    assert choose([]) is None


def served_errors(bank, adapters: dict) -> dict[str, float]:
    """Per adapter: mean over modules of ‖ΔW_served − ΔW_uploaded‖² / ‖ΔW_uploaded‖², from the bank's own
    export (the factors every engine serves), against the uploaded factors."""
    from compression import adapter_factors

    out = {}
    for name, adapter in adapters.items():
        errors = []
        for module, (B, A) in adapter_factors(bank, name).items():
            want = adapter.delta(module)
            errors.append(float(((B @ A - want) ** 2).sum() / (want ** 2).sum()))
        out[name] = sum(errors) / len(errors)
    return out


def test_sweep_publishes_the_smallest_bank_serving_every_adapter_within_budget(ray_session, tiny_model, tmp_path):
    from compression import load_peft_adapter
    from train_jobs.bank_sweep import main

    adapters = tmp_path / "adapters"
    for i in range(6):
        make_peft_adapter(tiny_model.path, adapters / f"t{i}", seed=i)
    store = tmp_path / "store"
    budget = 0.3
    report = main(["--adapters", str(adapters), "--model", "tiny-random", "--ranks", "4,8", "--clusters", "1,2",
                   "--methods", "full,diag", "--budget", str(budget), "--publish", "--bank", "small", "--store",
                   str(store), "--out", str(tmp_path / "out"), "--trial-cpus", "0.5"])
    assert len(report["trials"]) == 8
    assert {(t["rank"], t["clusters"], t["method"]) for t in report["trials"]} == {
        (r, k, m) for r in (4, 8) for k in (1, 2) for m in ("full", "diag")}
    for t in report["trials"]:
        assert 0 <= t["mean_error"] <= t["max_error"] <= budget and t["max_error"] <= t["fit_max_error"] <= 1
        assert (t["exact_adapters"] > 0) == (t["fit_max_error"] > budget) and 0 < t["param_ratio"]
    assert any(t["exact_adapters"] for t in report["trials"])  # some fits leave adapters over the budget
    choice = report["choice"]
    assert choice["bank_params"] == min(t["bank_params"] for t in report["trials"])
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["choice"] == choice
    bank, version = read_bank(Registry(str(store)), "small")
    assert version == report["published_version"] == 1
    assert (bank.rank >= choice["rank"], bank.method) == (True, choice["method"])
    assert bank.base_model_hash == tiny_model.content_hash and len(bank.adapters) == 6
    assert len(bank.exact) == choice["exact_adapters"]
    uploaded = {f"local/t{i}": load_peft_adapter(adapters / f"t{i}", name=f"local/t{i}") for i in range(6)}
    errors = served_errors(bank, uploaded)
    assert max(errors.values()) <= budget + 1e-4, errors
    assert all(errors[a] < 1e-8 for a in bank.exact)


def test_refit_keeps_uploads_made_while_it_ran_and_serves_them_within_budget(ray_session, tiny_model, tmp_path,
                                                                             monkeypatch):
    from cluster import bank_refit
    from cluster.banks import bank_metadata, load_registry_adapter
    from cluster.models import resolve_model

    registry = Registry(str(tmp_path / "store"))
    registry.create_tenant("acme")
    model = resolve_model("tiny-random")

    def upload(name: str, seed: int) -> None:
        d = make_peft_adapter(tiny_model.path, tmp_path / f"{name}-{seed}", seed=seed)
        files = {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".json", ".safetensors")}
        registry.publish("acme", "adapter", name, files)
        add_to_bank(registry, "small", model, "acme", name, budget=0.05)

    for i in range(4):
        upload(f"a{i}", seed=i)
    bank, _ = read_bank(registry, "small")
    assert len(bank.exact) == 4  # random subspaces: every one is stored exactly
    assert bank_metadata(registry, "small")["exact_params_since_refit"] > 0

    from cluster import bank_tune

    real_sweep = bank_tune.run_sweep

    def sweep_while_tenants_upload(*args, **kwargs):
        rows = real_sweep(*args, **kwargs)
        upload("late", seed=10)  # a new adapter, published while the refit runs
        upload("a1", seed=11)  # a re-upload: new weights under an old name
        return rows

    monkeypatch.setattr(bank_tune, "run_sweep", sweep_while_tenants_upload)
    report = bank_refit.refit_bank(str(tmp_path / "store"), "small", "tiny-random", budget=0.05, ranks=(4, 8),
                                   clusters=(1, 2), methods=("full",), out=str(tmp_path / "out"), trial_cpus=0.5)
    assert sorted(report["merged_after_refit"]) == ["acme/a1", "acme/late"]
    bank, version = read_bank(registry, "small")
    assert version == report["published_version"] and sorted(bank.adapters) == [
        "acme/a0", "acme/a1", "acme/a2", "acme/a3", "acme/late"]
    meta = bank_metadata(registry, "small")
    assert meta["refit"]["from_version"] == report["from_version"] and meta["error_budget"] == 0.05
    latest = {n: load_registry_adapter(registry, "acme", n.split("/")[1], model) for n in bank.adapters}
    errors = served_errors(bank, latest)
    assert max(errors.values()) <= 0.05 + 1e-4, errors  # the re-uploaded a1 is served as re-uploaded
    old_a1 = make_peft_adapter(tiny_model.path, tmp_path / "old-a1", seed=1)
    from compression import load_peft_adapter

    assert served_errors(bank, {"acme/a1": load_peft_adapter(old_a1, name="acme/a1")})["acme/a1"] > 0.5
    assert torch.isfinite(torch.tensor(list(errors.values()))).all()
