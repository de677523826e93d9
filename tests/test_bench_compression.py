"""bench.compression on tiny-random: adapters from the LoRA job's shard loop, the whole bench in quick
mode (banks, accuracy through attach_bank, PEFT export checks, synthetic scale, result files), and
the budget rule."""

from __future__ import annotations

import json

import pytest

from bench import compression as bench


def test_suggested_budget_is_the_error_below_which_every_bank_keeps_the_target():
    rows = [{"config": c, "mean_error": e, "train_kept": a, "val_kept": h}
            for c, e, a, h in [("a", 0.05, 1.0, 0.99), ("b", 0.2, 0.97, 0.96), ("c", 0.35, 0.99, 0.93),
                               ("d", 0.5, 0.96, 0.97), ("e", 0.8, 0.4, 0.3), ("f", 0.6, 0.9, 0.9)]]
    assert bench.suggest_budget(rows, 0.95) == (0.5, rows[5])  # f (0.6) misses on the trained phrasings
    both = ("train_kept", "val_kept")
    assert bench.suggest_budget(rows, 0.95, both) == (0.2, rows[2])  # held-out drops below 95 % at 0.35
    assert bench.suggest_budget(rows, 0.3) == (0.8, None)
    assert bench.suggest_budget(rows[4:5], 0.95) == (None, rows[4])
    assert bench.suggest_budget([{"mean_error": 0.1}], 0.95) == (None, None)  # rows without accuracy are ignored


def test_adapter_budget_is_judged_among_adapters_of_similar_error():
    from bench.compression_eval import adapter_budget

    # 300 near-exact adapters keep everything; the next 100 (errors 0.02-0.03) keep 97 %; then 80 %
    pairs = [(0.0001 * i, 1.0, 1.0) for i in range(300)] + [(0.02 + 0.0001 * i, 0.97, 1.0) for i in range(100)] + \
        [(0.05 + 0.001 * i, 0.8, 1.0) for i in range(100)]
    budget, info = adapter_budget(pairs, 0.95, bin_size=100)
    assert budget == pytest.approx(0.0299) and [b["n"] for b in info["bins"]] == [100] * 5
    # over all 500 adapters the mean would still pass 95 % (diluted by the near-exact ones); the bins do not
    assert sum(a for _, a, _ in pairs) / len(pairs) >= 0.95
    assert adapter_budget([(0.5, 0.2, 1.0)] * 10, 0.95, 5)[0] is None
    assert adapter_budget([(0.1, 0.0, 0.0)] * 4, 0.95, 2)[0] is None  # nothing to keep is not "kept"


def test_best_at_sizes_chooses_on_validation_and_reports_test():
    from bench.compression_eval import best_at_sizes

    rows = [{"method": "full", "config": "a", "bank_pct": 4.0, "val_kept": 0.9, "test_kept": 0.7, "train_kept": 1},
            {"method": "full", "config": "b", "bank_pct": 9.0, "val_kept": 0.8, "test_kept": 0.95, "train_kept": 1},
            {"method": "share", "config": "s", "bank_pct": 12.0, "val_kept": 0.5, "test_kept": 0.5, "train_kept": 1}]
    best = best_at_sizes(rows, [5.0, 10.0, 20.0])
    assert [(r["method"], r["size_limit_pct"], r["config"]) for r in best] == [
        ("full", 5.0, "a"), ("full", 10.0, "a"), ("full", 20.0, "a"), ("share", 20.0, "s")]
    assert best[1]["test_kept"] == 0.7  # test never decides


def test_grid_spec_is_parsed_and_checked():
    assert bench.parse_grid("full:16:4, diag:64:1,svd:2,share:32,vlora:9,full:8:200", 100) == [
        bench.Spec("full", 16, 4), bench.Spec("diag", 64, 1), bench.Spec("svd", 2, 100), bench.Spec("share", 32, 100),
        bench.Spec("vlora", 9, 100)]
    for bad in ("full:16", "svd:2:3", "sparse:4:1", "share:4:2"):
        with pytest.raises(SystemExit, match="--grid item"):
            bench.parse_grid(bad, 10)


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--adapters", "--limit", "--score-adapters", "--grid", "--target-accuracy", "--target-params", "--budget-bin",
                 "--peft-checks", "--add-adapters", "--quick", "--out"):
        assert flag in text
    from bench import compression_scale

    with pytest.raises(SystemExit):
        compression_scale.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--synthetic-n", "--synthetic-grid", "--family-n", "--families", "--family-noise", "--family-grid",
                 "--scaling-sizes", "--budget", "--max-concurrent", "--quick", "--out"):
        assert flag in text


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model, tmp_path_factory):
    """Four codebook adapters for tiny-random, written by the LoRA job's own shard loop (no Ray)."""
    from compression.codebook.tasks import TrainConfig
    from train_jobs.lora_adapters import run_shard

    out = tmp_path_factory.mktemp("adapters")
    config = {"model": tiny_model.to_json(), "train": TrainConfig(num_layers=2, rank=4, steps=6).model_dump(),
              "out": str(out), "task_ids": [0, 1, 2, 3], "seed": 0, "num_keys": 8, "threads": 1,
              "report_every": 4, "publish": False}
    assert run_shard(config, rank=0, world=1)["trained"] == 4
    return out


def test_quick_bench_measures_banks_and_share_through_the_serving_op(tiny_adapters, tmp_path):
    out = tmp_path / "out"
    payload = bench.main(["--quick", "--model", "tiny-random", "--adapters", str(tiny_adapters), "--out", str(out),
                          "--grid", "full:2:1,full:8:1,full:2:2,diag:4:1,svd:1,share:4,vlora:2,full:2:9",
                          "--budget-bin", "2", "--add-adapters", "2"])
    rows = {r["config"]: r for r in payload["banks"]}
    original = rows["original adapters (exact bank)"]
    # the originals through BankLinear reproduce the training job's own (PEFT) evaluation exactly, per split
    recorded = [json.loads(p.read_text())["metrics"] for p in sorted(tiny_adapters.glob("*/task.json"))]
    for split, key in (("train", "accuracy"), ("val", "heldout_accuracy"), ("test", "test_accuracy")):
        assert original[f"{split}_exact"] == pytest.approx(sum(m[key] for m in recorded) / 4, abs=1e-4)
    assert original["mean_error"] == 0 and original["agreement"] == 1.0
    # rank 8 >= the LoRA rank 4 with K=1 shares one basis but is still near-lossless; rank 2 is not
    assert rows["full r=8 K=1"]["mean_error"] < rows["full r=2 K=1"]["mean_error"]
    assert rows["full r=8 K=1"]["agreement"] >= rows["full r=2 K=1"]["agreement"]
    assert set(rows) == {"original adapters (exact bank)", "full r=2 K=1", "full r=8 K=1", "full r=2 K=2",
                         "diag r=4 K=1", "svd r=1", "share k=4", "vlora k=2"}  # K=9 > 4 adapters is dropped
    for r in payload["banks"][1:]:
        assert 0 <= r["mean_error"] <= r["max_error"] <= 1.0001 and r["fit_cpu_s"] >= 0 and r["bank_pct"] > 0
    # served at a budget: exact adapters answer as the originals; a zero budget serves everything exactly
    for s in payload["served"]:
        bank = rows[s["base"]]
        assert s["bank_pct"] >= bank["bank_pct"] - 1e-6 or s["exact"] == 0
        if s["budget"] <= min(r["error"] for r in payload["per_adapter"][s["base"]]):
            assert s["agreement"] == 1.0 and s["exact"] == 4
    assert {"share", "vlora", "svd"} <= set(payload["add_one_s"])
    if any(c["bank"] != "original" for c in payload["peft_checks"]):
        assert {"jd_projection", "jd_within_budget"} <= set(payload["add_one_s"])
    # exported PEFT dirs (original, compressed, and an exact adapter of a served bank) answer as the bank op does
    assert {c["bank"] for c in payload["peft_checks"]} >= {"original"}
    for check in payload["peft_checks"]:
        assert check["answers_equal"] == 1.0 and check["max_abs_logit_diff"] < 1e-4 * max(1.0, check["logit_scale"])
    assert payload["share_packages"] == {"lorashare": "0.1.3", "vlora-dev": "1.0.0"}
    saved = json.loads((out / "compression.json").read_text())
    assert saved["banks"] == payload["banks"] and saved["budget"] == payload["budget"]
    md = (out / "compression.md").read_text()
    assert "python -m bench.compression --quick" in md and "TEST paraphrases" in md and "SHARE" in md
    for png in ("compression.png", "compression_val.png"):
        assert (out / png).stat().st_size > 5000


def test_scoring_a_subset_fits_on_all_and_scores_the_evenly_spread_ones(tiny_adapters, tmp_path):
    assert bench.scored_indices(100, 30)[:4] == [0, 3, 7, 10] and len(bench.scored_indices(100, 30)) == 30
    assert bench.scored_indices(4, 0) == bench.scored_indices(4, 9) == [0, 1, 2, 3]
    payload = bench.main(["--quick", "--model", "tiny-random", "--adapters", str(tiny_adapters), "--out",
                          str(tmp_path), "--grid", "full:2:1", "--score-adapters", "2", "--add-adapters", "1",
                          "--budget-bin", "1", "--peft-checks", "0"])
    assert payload["adapters"] == 4 and [n.split("/")[-1] for n in payload["scored"]] == ["codebook-0000",
                                                                                          "codebook-0002"]
    assert [r["adapter"] for r in payload["per_adapter"]["full r=2 K=1"]] == payload["scored"]
    assert all(s["exact"] <= 4 for s in payload["served"])  # served banks still hold all 4 adapters
    assert "2 of them, spread evenly" in (tmp_path / "compression.md").read_text()


def test_family_collection_and_scaling_without_ray():
    from bench import compression_scale as scale
    from cluster.logs import get_logger
    from compression.synthetic_adapters import synthetic_collection

    shapes = {"layers.0.q": (32, 24), "layers.0.v": (16, 24)}
    coll = synthetic_collection(6, shapes, clusters=2, r0=4, latent_rank=2, noise=0.01, seed=1)
    trained = [(a, "fam-a" if label == 0 else "fam-b") for a, label in zip(coll.adapters, coll.labels, strict=True)]
    perturbed, labels = scale.family_collection(trained, ["fam-a"], 20, noise=0.1, seed=0)
    assert set(labels) == {"fam-a"} and len({a.name for a in perturbed}) == 20
    source = {a.name: a for a, f in trained}
    for a in perturbed[:3]:
        for m, (B, _) in a.factors.items():
            nearest = min(float((B - s.factors[m][0]).norm() / s.factors[m][0].norm()) for s in source.values())
            assert 0.05 < nearest < 0.15  # a perturbed copy of one trained adapter
    rows = scale.scaling(perturbed, [5, 20], "full", 4, 1, 0.05, 0, get_logger("test"))
    assert [r["adapters"] for r in rows] == [5, 20] and all(r["fit_wall_s"] >= 0 for r in rows)


def test_quick_scale_bench_fits_the_planted_grid(tiny_adapters, tmp_path):
    from bench import compression_scale

    payload = compression_scale.main(["--quick", "--model", "tiny-random", "--adapters", str(tiny_adapters),
                                      "--out", str(tmp_path), "--synthetic-n", "12", "--family-n", "0"])
    (row,) = [r for r in payload["synthetic"] if r["config"] == "full r=4 K=2"]
    assert row["adapters"] == 12 and row["bank_pct"] > 0
    assert row["served_exact"] == 0 or row["served_pct"] > row["bank_pct"]  # exact copies cost their own size
    md = (tmp_path / "compression_scale.md").read_text()
    assert "STRUCTURED SYNTHETIC" in md and "the whole r x K grid" in md


@pytest.mark.ray
def test_quick_scale_bench_sweeps_perturbed_families_without_being_told_k(ray_session, tiny_adapters, tmp_path):
    from bench import compression_scale

    payload = compression_scale.main(["--quick", "--model", "tiny-random", "--adapters", str(tiny_adapters),
                                      "--out", str(tmp_path), "--synthetic-n", "0", "--family-n", "16",
                                      "--families", "crate-colors,project-status", "--scaling-sizes", "8,16"])
    sweep = payload["family_sweep"]
    assert sweep["adapters"] == 16 and sweep["families"] == ["crate-colors", "project-status"]
    assert len(sweep["trials"]) == 4 and sweep["choice"]["clusters"] in (1, 2)
    assert sum(r["adapters"] for r in sweep["clusters_vs_families"]) == 16
    assert [r["adapters"] for r in payload["scaling"]] == [8, 16]
    assert (tmp_path / "compression_scaling.png").stat().st_size > 5000
