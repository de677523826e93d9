"""bench.compression on tiny-random: adapters from the LoRA job's shard loop, the whole bench in quick
mode (banks, accuracy through attach_bank, PEFT export checks, synthetic scale, result files), and
the budget rule."""

from __future__ import annotations

import json

import pytest

from bench import compression as bench


def test_suggested_budget_is_the_error_below_which_every_bank_keeps_the_target():
    rows = [{"config": c, "mean_error": e, "accuracy_retained": a, "heldout_accuracy_retained": h}
            for c, e, a, h in [("a", 0.05, 1.0, 0.99), ("b", 0.2, 0.97, 0.96), ("c", 0.35, 0.99, 0.93),
                               ("d", 0.5, 0.96, 0.97), ("e", 0.8, 0.4, 0.3), ("f", 0.6, 0.9, 0.9)]]
    assert bench.suggest_budget(rows, 0.95) == (0.5, rows[5])  # f (0.6) misses on the trained phrasings
    both = ("accuracy_retained", "heldout_accuracy_retained")
    assert bench.suggest_budget(rows, 0.95, both) == (0.2, rows[2])  # held-out drops below 95 % at 0.35
    assert bench.suggest_budget(rows, 0.3) == (0.8, None)
    assert bench.suggest_budget(rows[4:5], 0.95) == (None, rows[4])
    assert bench.suggest_budget([{"mean_error": 0.1}], 0.95) == (None, None)  # rows without accuracy are ignored


def test_grid_spec_is_parsed_and_checked():
    assert bench.parse_grid("full:16:4, diag:64:1,svd:2,full:8:200", 100) == [
        bench.Spec("full", 16, 4), bench.Spec("diag", 64, 1), bench.Spec("svd", 2, 100)]
    for bad in ("full:16", "svd:2:3", "sparse:4:1"):
        with pytest.raises(SystemExit, match="--grid item"):
            bench.parse_grid(bad, 10)


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--adapters", "--limit", "--eval-adapters", "--grid", "--target-accuracy", "--target-params",
                 "--peft-checks", "--synthetic-n", "--synthetic-grid", "--quick", "--out"):
        assert flag in text


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model, tmp_path_factory):
    """Four codebook adapters for tiny-random, written by the LoRA job's own shard loop (no Ray)."""
    from train_jobs.lora_adapters import run_shard
    from train_jobs.lora_tasks import TrainConfig

    out = tmp_path_factory.mktemp("adapters")
    config = {"model": tiny_model.to_json(), "train": TrainConfig(num_layers=2, rank=4, steps=6).model_dump(),
              "out": str(out), "task_ids": [0, 1, 2, 3], "seed": 0, "num_keys": 8, "threads": 1,
              "report_every": 4, "publish": False}
    assert run_shard(config, rank=0, world=1)["trained"] == 4
    return out


def test_quick_bench_measures_banks_through_the_serving_op(tiny_adapters, tmp_path):
    out = tmp_path / "out"
    payload = bench.main(["--quick", "--model", "tiny-random", "--adapters", str(tiny_adapters), "--out", str(out),
                          "--grid", "full:2:1,full:8:1,full:2:2,diag:4:1,svd:1,full:2:9", "--synthetic-n", "12",
                          "--synthetic-grid", "full:4:2"])
    rows = {r["config"]: r for r in payload["banks"]}
    original = rows["original adapters (exact bank)"]
    # the originals through BankLinear reproduce the training job's own (PEFT) evaluation exactly
    recorded = [json.loads(p.read_text())["metrics"] for p in sorted(tiny_adapters.glob("*/task.json"))]
    assert original["accuracy"] == pytest.approx(sum(m["accuracy"] for m in recorded) / 4, abs=1e-4)
    assert original["mean_error"] < 1e-6 and original["answer_agreement"] == 1.0
    # rank 8 >= the LoRA rank 4 with K=1 shares one basis but is still near-lossless; rank 2 is not
    assert rows["full r=8 K=1"]["mean_error"] < rows["full r=2 K=1"]["mean_error"]
    assert rows["full r=8 K=1"]["answer_agreement"] >= rows["full r=2 K=1"]["answer_agreement"]
    assert set(rows) == {"original adapters (exact bank)", "full r=2 K=1", "full r=8 K=1", "full r=2 K=2",
                         "diag r=4 K=1", "svd r=1"}  # K=9 > 4 adapters is dropped
    for r in payload["banks"][1:]:
        assert 0 <= r["mean_error"] <= r["max_error"] <= 1 and r["fit_cpu_s"] >= 0
    # exported PEFT dirs (original and compressed) give the same answers as the bank op
    assert {c["bank"] for c in payload["peft_checks"]} >= {"original"} and len(payload["peft_checks"]) == 2
    for check in payload["peft_checks"]:
        assert check["answers_equal"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 * max(1.0, check["logit_scale"])
    assert payload["synthetic"][0]["adapters"] == 12 and payload["synthetic"][0]["reduction_pct"] > 0
    saved = json.loads((out / "compression.json").read_text())
    assert saved["banks"] == payload["banks"] and saved["suggested_budget"] == payload["suggested_budget"]
    md = (out / "compression.md").read_text()
    assert "python -m bench.compression --quick" in md and "STRUCTURED SYNTHETIC" in md and "2407.00066" in md
    for png in ("compression.png", "compression_error.png"):
        assert (out / png).stat().st_size > 5000
