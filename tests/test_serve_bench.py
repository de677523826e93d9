"""CI smoke run of bench/serving.py (tiny model, a few requests; no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


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
    joins = [r for r in results if r["scenario"] == "join"]
    assert len(joins) == 2 and all(j["join"]["ratio"] > 0 for j in joins)
    assert {"ceiling_tok_s", "best_pool", "vs_ceiling", "vs_peft", "join_ratio"} <= set(data["targets"])
    assert (tmp_path / "serving.png").stat().st_size > 1000
    assert "Atelier torch pool (bank)" in (tmp_path / "serving.md").read_text()
