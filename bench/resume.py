"""Time a killed connectors job saves by resuming from its stage-1 Ray Train checkpoint.

Three runs of the same connectors job (``train_jobs.connectors``: the real base model by default,
epochs from ``--config``, optionally a ``--time-budget``), each its own driver process against one
local Ray:

1. **uninterrupted** (the baseline: what a resubmission without checkpoints costs);
2. the same job for another tenant, **SIGKILLed** (a real driver process) once Ray Train has
   registered its stage-1 checkpoint;
3. that job **submitted again**: it resumes from the checkpoint (skips stage 1).

Reports each run's wall seconds, the time saved by resuming (uninterrupted − resubmission) and what
the kill cost in all (killed run + resubmission − uninterrupted), and checks by value that the
resubmission published the checkpoint's encoder weights. The tenants' expert is an untrained network
of the schema's shape (training time does not depend on its weights).

    python -m bench.resume --config '{"train_questions": 600, "stage2_questions": 150, "eval_questions": 60}'
        # -> docs/bench/resume.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "examples" / "schemas" / "titanic.json"


def publish_untrained_expert(registry, tenant: str, name: str, hidden_sizes: tuple[int, ...] | None = None) -> None:
    """The tenant's titanic schema and an untrained expert of its shape (what ``train_jobs.experts``
    would leave; also the connectors-job tests' tenant)."""
    from llamdex.expert import ExpertArch, ExpertSpec, build_expert, save_expert
    from llamdex.expert_spec import DPLedger

    registry.create_tenant(tenant)
    registry.publish(tenant, "schema", SCHEMA.stem, {"schema.json": SCHEMA.read_bytes()})
    schema = json.loads(SCHEMA.read_text())
    arch = ExpertArch.from_schema(schema, hidden_sizes=hidden_sizes) if hidden_sizes else ExpertArch.from_schema(schema)
    ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0.0, sample_rate=0.1, steps=1, epochs=1,
                      accountant="none")
    with tempfile.TemporaryDirectory() as tmp:
        save_expert(build_expert(arch), ExpertSpec.build(SCHEMA.read_text(), arch, ledger), tmp)
        registry.publish(tenant, "expert", name, {p.name: p.read_bytes() for p in Path(tmp).iterdir()})


def _job_process(argv: list[str], gcs: str) -> tuple[list[str], dict]:
    """The command and environment of one connectors job driver on the Ray at ``gcs``."""
    return ([sys.executable, "-m", "train_jobs.connectors", *argv],
            {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": gcs})


def run_job(argv: list[str], gcs: str) -> tuple[float, dict]:
    """Run the job to the end as its own process (as ``ray job submit`` would); (seconds, its result row)."""
    cmd, env = _job_process(argv, gcs)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the connectors job failed (exit {done.returncode}): {done.stderr[-2000:]}")
    rows = json.loads(done.stdout[done.stdout.rindex("\n[") + 1:] if "\n[" in done.stdout else done.stdout)
    return seconds, rows[0]


def kill_after_stage_one(argv: list[str], storage: Path, gcs: str, timeout_s: float) -> float:
    """Run the job as its own process; SIGKILL it once the stage-1 checkpoint is registered. Seconds run."""
    cmd, env = _job_process(argv, gcs)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline and not any(
            "encoder" in p.read_text() for p in storage.glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if not list(storage.glob("*/checkpoint*/encoder.safetensors")):
        raise RuntimeError("the killed job left no stage-1 checkpoint; raise --timeout")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model (catalog name or directory)")
    p.add_argument("--time-budget", type=float, default=0, help="the job's --time-budget, seconds (0: none, "
                   "the config's epochs decide)")
    p.add_argument("--config", default="{}", help="further ConnectorsConfig overrides (JSON)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the stage-1 checkpoint")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default="resume", help="result file stem")
    args = p.parse_args(argv)

    import ray
    import torch
    from safetensors.torch import load_file

    from bench.common import command_line, write_results
    from cluster.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="atelier-resume-"))
    store, registry = str(work / "store"), Registry(str(work / "store"))
    ray.init(num_cpus=2, include_dashboard=False)
    gcs = ray.get_runtime_context().gcs_address

    def job(tenant: str, storage: Path) -> list[str]:
        budget = ["--time-budget", str(args.time_budget)] if args.time_budget > 0 else []
        return ["--tenant", tenant, "--name", "survival", "--model", args.model, *budget, "--config", args.config,
                "--store", store, "--storage-path", str(storage)]

    for tenant in ("straight", "killed"):
        publish_untrained_expert(registry, tenant, "survival")
    straight_s, straight = run_job(job("straight", work / "ray-straight"), gcs)
    killed_s = kill_after_stage_one(job("killed", work / "ray-killed"), work / "ray-killed", gcs, args.timeout)
    encoder_state = load_file(next((work / "ray-killed").glob("*/checkpoint*/encoder.safetensors")))
    resumed_s, resumed = run_job(job("killed", work / "ray-killed"), gcs)
    published = load_file(registry.materialize(registry.resolve("killed", "connectors", "survival"), work / "c")
                          / "connectors.safetensors")
    same = all(torch.equal(published[f"encoder.{k}"], v) for k, v in encoder_state.items())
    ray.shutdown()
    row = {"uninterrupted s": round(straight_s, 1), "killed after stage 1 s": round(killed_s, 1),
           "resubmission s": round(resumed_s, 1), "saved by resuming s": round(straight_s - resumed_s, 1),
           "saved %": round(100 * (straight_s - resumed_s) / straight_s, 1),
           "kill cost in all s": round(killed_s + resumed_s - straight_s, 1),
           "resumed_from": resumed["resumed_from"], "stage 1 s (job's report)": resumed["stage1_seconds_saved"],
           "published encoder = checkpoint's": same}
    write_results(Path(args.out), args.name, {"runs": {"uninterrupted": straight, "resumed": resumed}, "row": row},
                  [row], "Connectors job: resume from the stage-1 checkpoint vs starting over",
                  command_line("bench.resume", argv),
                  notes=f"`{args.model}`, `--time-budget {args.time_budget:g}` (0: none), `--config {args.config}`, one Ray "
                        "Train worker (1 CPU, 1 thread); "
                        "the uninterrupted run is the baseline (a resubmission without checkpoints). Wall seconds "
                        "include Ray Train's worker start and the base model's load.")
    print(json.dumps(row))
    if not same:
        raise SystemExit("the resubmission did not publish the checkpoint's encoder")
    return row


if __name__ == "__main__":
    main()
