"""Short versions of bench/faults.py: a replica killed under load, a worker node lost while serving.
No non-streaming request may fail (the router retries calls lost with their replica), and Serve
must be back to full strength. The full runs and their numbers: docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ray import serve

from bench import faults
from tests.conftest import ROOT
from tests.serve_fixtures import PORT

pytestmark = pytest.mark.ray


def test_replica_killed_under_load_is_replaced_and_no_request_fails(ray_session, tiny_model, tmp_path, capsys):
    app = faults.deploy("tiny-random", PORT, tmp_path, replicas=2, multinode=False)
    try:
        result = faults.run_scenario("replica killed", app, seconds=14, kill_at=4, clients=3, replicas=2,
                                     fault=faults.kill_replica)
    finally:
        serve.delete(faults.APP)
    with capsys.disabled():
        print(f"\nreplica killed: {result['total']}, back to 2 replicas after {result['recovered_after_s']} s")
    assert result["seen_down_after_s"] is not None, "Serve never noticed the kill"
    assert result["recovered_after_s"] is not None, "Serve did not replace the replica"
    assert result["total"]["failed"] == 0, result["errors"]
    assert result["total"]["ok"] > 20


def test_worker_node_lost_while_serving(tmp_path, capsys):
    """Its own two-node cluster (ray.cluster_utils) in a subprocess, beside the session's."""
    proc = subprocess.run([sys.executable, "-m", "bench.faults", "node", "--seconds", "16", "--kill-at", "4",
                           "--rejoin-after", "5", "--clients", "3", "--variants", "retry", "--port", "18310",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / "faults_node.json").read_text())["runs"][0]
    with capsys.disabled():
        print(f"\nnode lost: {run['total']}, back to 2 replicas after {run['recovered_after_s']} s")
    assert run["total"]["failed"] == 0, run["errors"]
    assert run["fault_to_recovery"]["ok"] > 0, "the service must keep answering on the remaining node"
    assert run["recovered_after_s"] is not None
