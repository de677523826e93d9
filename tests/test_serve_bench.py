"""CI smoke run of bench/serving.py (tiny model, a few requests; no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_serving_bench_smoke(tmp_path, atelier_home):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.serving", "--smoke", "--threads", "1", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "serving.json").read_text())
    results = data["results"]
    assert not [r for r in results if "error" in r], [r.get("error") for r in results]
    swept = {(r["contender"], r["n"]) for r in results if r["scenario"] == "sweep"}
    assert swept == {("torch-base", 0), ("torch-bank", 2), ("peft", 2), ("torch-static-bank", 2)}
    for r in results:
        if r["scenario"] == "sweep":
            assert r["output_tokens"] == r["requests"] * 4 and r["tok_s"] > 0 and r["peak_rss_mb"] > 0
            assert r["device"] == "cpu"  # the report says where each number came from
    joins = [r for r in results if r["scenario"] == "join"]
    assert len(joins) == 2 and all(j["join"]["ratio"] > 0 for j in joins)
    assert {"ceiling_tok_s", "best_pool", "vs_ceiling", "vs_peft", "join_ratio"} <= set(data["targets"])
    assert (tmp_path / "serving.png").stat().st_size > 1000
    assert "Atelier torch pool (bank)" in (tmp_path / "serving.md").read_text()


def _row(contender, n, tok_s, run=None):
    row = {"scenario": "sweep", "contender": contender, "n": n, "tok_s": tok_s}
    return {**row, "run": run} if run else row


def test_targets_take_the_ceiling_from_the_run_that_measured_the_largest_n():
    """--combine merges runs; the targets compare the largest N with the bases measured beside it."""
    from bench.serving_report import targets

    results = [_row("torch-base", 0, 50.0, "a"), _row("torch-bank", 100, 45.0, "a"), _row("peft", 100, 10.0, "a"),
               _row("torch-base", 0, 40.0, "b"), _row("vllm-base", 0, 30.0, "b"), _row("torch-bank", 1000, 36.0, "b"),
               _row("peft", 1000, 6.0, "b"), _row("vllm-lora", 1000, 20.0, "b")]
    goals = targets(results)
    assert goals["n"] == 1000 and goals["ceiling_tok_s"] == 40.0 and goals["best_pool"] == "torch-bank"
    assert goals["vs_ceiling"] == 0.9 and goals["vs_ceiling_ok"] and goals["vs_peft"] == 6.0 and goals["vs_vllm_lora_ok"]
    # one run (no "run" tags): every base counts
    assert targets([_row("torch-base", 0, 50.0), _row("vllm-base", 0, 60.0), _row("torch-bank", 10, 30.0)])[
        "ceiling_tok_s"] == 60.0


def test_targets_take_the_median_of_repeated_runs():
    """Three runs at N=1000 (noisy machine): each contender counts with the median of its runs."""
    from bench.serving_report import targets

    results = []
    for run, (base, bank, peft) in {"r1": (43.0, 46.0, 13.0), "r2": (50.0, 40.0, 12.0), "r3": (48.0, 44.0, 9.0)}.items():
        results += [_row("torch-base", 0, base, run), _row("torch-bank", 1000, bank, run), _row("peft", 1000, peft, run)]
    goals = targets(results)
    assert goals["ceiling_tok_s"] == 48.0 and goals["best_pool_tok_s"] == 44.0
    assert goals["vs_ceiling"] == round(44.0 / 48.0, 2) and goals["vs_peft"] == round(44.0 / 12.0, 2)


def test_sweep_plan_is_ordered_by_n():
    """A stopped run keeps the small Ns: bases first, then every contender at each N, the reference manager last."""
    from bench.serving import plan

    class Args:
        model, cache, threads, max_rows, concurrency, requests, prompt_tokens, max_tokens = "m", "c", 1, 16, 8, 8, 8, 8
        dtype, reps, vllm_cpus, scenarios, mixed_requests, mixed_n = "float32", 1, None, ["sweep"], 4, 2
        contenders, ns = ["hf-cb-base", "torch-base", "torch-bank", "peft"], [1, 10]

    order = [(s["contender"], s["n"]) for s in plan(Args)]
    assert order == [("torch-base", 0), ("torch-bank", 1), ("peft", 1), ("torch-bank", 10), ("peft", 10),
                     ("hf-cb-base", 0)]
