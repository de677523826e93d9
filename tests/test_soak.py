"""Short version of bench/soak.py: mixed base/adapter/expert traffic from several tenants with zero
errors and bounded replica memory, then the flood measurement (tenant B alone vs during A's flood).
The full runs and their numbers: docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_short_soak_and_flood(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "all", "--seconds", "20", "--clients", "8",
                           "--tenants", "2", "--replicas", "1", "--flood-seconds", "10", "--flood-clients", "8",
                           "--max-tokens", "8", "--tenant-max-in-flight", "2", "--port", "18410",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    soak, *floods = json.loads((tmp_path / "soak.json").read_text())["runs"]
    with capsys.disabled():
        print(f"\nsoak: {soak['total']}; RSS MB {soak['rss_mb_start']} -> {soak['rss_mb_end']}; "
              f"flood: B p99 ratio {[(f['tenant_max_in_flight'], f['b_p99_ratio']) for f in floods]}")
    assert soak["total"]["failed"] == 0, soak["errors"]
    assert all(s["ok"] > 0 for s in soak["by_kind"].values()), soak["by_kind"]
    for name, start in soak["rss_mb_start"].items():
        assert soak["rss_mb_end"][name] < start * 1.5 + 100, "replica memory grew during a 20 s soak"
    assert [f["tenant_max_in_flight"] for f in floods] == [2]  # the uncapped baseline: bench/soak.py
    for flood in floods:  # A waits behind its cap at the router, never refused
        assert flood["b_loaded"]["failed"] == 0 and flood["b_unloaded"]["failed"] == 0, flood["errors"]
        assert flood["a"]["failed"] == 0 and flood["a"]["ok"] > 0, flood["errors"]
        assert flood["b_p99_ratio"] is not None
