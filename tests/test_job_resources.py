"""Jobs beside a running service: they fit (fractional worker CPUs, relative paths read where the
user typed them) or fail fast naming the missing CPUs and the fix; a job whose workers' tasks
fail exits non-zero listing every failed task from every rank."""

from __future__ import annotations

import time

import pytest

from cluster.resources import CpuDemand, InsufficientResources, require_cpus
from tests.conftest import ROOT
from train_jobs.experts import ExpertJob, resolve_paths

DEMAND = CpuDemand("test worker", 1, 1.0, "--worker-cpus")


def test_require_cpus_fails_fast_naming_what_is_missing_and_the_fix():
    view = lambda: ({"CPU": 0.5}, {"CPU": 2.0}, [2.0])  # noqa: E731  (Serve holds 1.5 of 2 CPUs)
    started = time.monotonic()
    with pytest.raises(InsufficientResources, match=r"needs 1 CPU .* only 0.5 of the cluster's 2 CPU .*--worker-cpus"):
        require_cpus(DEMAND, wait_s=0.3, view=view, poll_s=0.05)
    assert time.monotonic() - started < 2
    assert require_cpus(CpuDemand("w", 1, 0.5, "--worker-cpus"), wait_s=0, view=view) == 0.5
    with pytest.raises(InsufficientResources, match="largest node has 2; fix: --worker-cpus 2 or less"):
        require_cpus(CpuDemand("w", 1, 4, "--worker-cpus"), wait_s=10, view=view)


def test_relative_paths_resolve_where_the_user_typed_them(tmp_path):
    job = ExpertJob(tenant="a1", name="x", schema_path="examples/schemas/titanic.json", paper_dataset="titanic")
    fixed = resolve_paths(job, cwd=ROOT)
    assert fixed.schema_path == str((ROOT / "examples/schemas/titanic.json").resolve())
    with pytest.raises(ValueError, match=r"schema_path: no file .* fix: pass an existing path with --schema"):
        resolve_paths(job, cwd=tmp_path)
    csv = ExpertJob(tenant="a1", name="x", schema_path=fixed.schema_path, data="private.csv")
    with pytest.raises(ValueError, match=r"data: no file .*private.csv.* --data"):
        resolve_paths(csv, cwd=tmp_path)


@pytest.mark.ray
def test_experts_job_beside_a_busy_cluster(ray_session, tmp_path, monkeypatch):
    """With 1.5 of 2 CPUs held (as the demo's service does), a 1-CPU worker fails fast with the fix;
    0.5 CPU fits and trains from a relative --schema typed in the repository root."""
    import ray

    from train_jobs.experts import main

    @ray.remote(num_cpus=1.5)
    class Service:
        def ping(self) -> bool:
            return True

    service = Service.remote()
    ray.get(service.ping.remote())
    monkeypatch.chdir(ROOT)
    argv = ["--tenant", "acme", "--name", "survival", "--schema", "examples/schemas/titanic.json",
            "--paper-dataset", "titanic", "--epsilon", "inf", "--epochs", "1", "--store", str(tmp_path / "store"),
            "--out", str(tmp_path / "out"), "--no-publish"]
    started = time.monotonic()
    with pytest.raises(InsufficientResources, match=r"needs 1 CPU .*only 0.5 .* free .*--worker-cpus"):
        main([*argv, "--wait-for-resources", "2"])
    assert time.monotonic() - started < 30
    results = main([*argv, "--worker-cpus", "0.5"])
    assert len(results) == 1 and results[0]["ledger"]["mechanism"] == "none"
    ray.kill(service)


@pytest.mark.ray
def test_lora_job_reports_every_workers_failed_tasks(ray_session, tmp_path):
    """Two Ray Train workers, every task fails (a target module the model does not have): the job
    raises JobFailed naming each task and both ranks, instead of returning rank 0's summary."""
    from train_jobs import lora_adapters as job

    out = tmp_path / "adapters"
    argv = ["--model", "tiny-random", "--num-adapters", "3", "--workers", "2", "--cpus-per-worker", "0.5",
            "--out", str(out), "--steps", "2", "--layers", "1", "--rank", "2", "--modules", "no_such_proj",
            "--report-every", "2", "--wait-for-resources", "10"]
    with pytest.raises(job.JobFailed) as info:
        job.main(argv)
    message = str(info.value)
    assert "3 of 3 tasks failed (on ranks [0, 1])" in message and "no_such_proj" in message
    failures = job.collect_failures(out, [p.stem for p in (out / job.FAILURES_DIR).iterdir()])
    assert sorted(f["task_id"] for f in failures) == [0, 1, 2]


@pytest.mark.ray
def test_lora_job_killed_mid_run_resumes_where_it_stopped(tiny_model, tmp_path):
    """SIGKILL the LoRA job (a real process) once some adapters are written; resubmitting trains
    only the rest (every finished adapter is its own checkpoint: task.json + fingerprint)."""
    import os
    import signal
    import subprocess
    import sys

    from train_jobs import lora_adapters as job

    out = tmp_path / "adapters"
    argv = ["--model", "tiny-random", "--num-adapters", "6", "--workers", "0", "--out", str(out),
            "--steps", "30", "--layers", "2", "--rank", "4", "--report-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "train_jobs.lora_adapters", *argv], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*/task.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*/task.json")))
    assert 2 <= done < 6, f"kill landed after {done} adapters; make the tasks longer"
    index = job.main(argv)
    rank0 = index["run"]["rank0"]
    assert rank0["skipped"] == done and rank0["trained"] == 6 - done and rank0["failed"] == 0
    assert index["summary"]["adapters"] == 6
