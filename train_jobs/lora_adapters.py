"""Ray job: train many small LoRA adapters (one per tenant codebook task) for one base model.

    python -m train_jobs.lora_adapters --model smollm2-135m --num-adapters 100 --workers 2 \\
        [--out DIR] [--publish --store URI]

Ray Train V2 ``TorchTrainer`` with ``ScalingConfig(num_workers=W, resources_per_worker={"CPU": 1})``.
The adapters are independent, so there is NO data parallelism and no DDP/gradient all-reduce:
each worker loads the base model once and trains a disjoint shard of task ids (``ids[rank::W]``)
one after another, reusing the base model (LoRA layers are injected per task and removed again).
Ray Train provides the worker group, resources, placement, failure handling and progress
reporting (``ray.train.report``, called the same number of times on every worker, as it is a
barrier). ``--workers 0`` runs the same loop in the driver (Ray Train local mode).

A thin Ray Train wrapper: the tasks, training, evaluation and the output directory are the
science package ``compression.codebook``. Output (default ``~/.cache/atelier/lora-adapters/<model>/``,
outside git) is the resumable directory of ``compression.codebook.store``: an adapter whose
``task.json`` fingerprint (task, training config, base-model content hash) matches is skipped. ``--publish`` publishes every adapter to the
artifact registry (tenant per task or per family; tenants are created when missing; unchanged
adapters are not re-published).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from cluster.logs import Timer, get_logger
from cluster.resources import DEFAULT_WAIT_S, CpuDemand, require_cpus
from compression.codebook.store import (
    ADAPTER_FILES,
    build_index,
    default_out_dir,
    fingerprint,
    reusable_record,
    train_and_write,
)

log = get_logger("train_jobs.lora_adapters")

# ------------------------------------------------------------------------------------------- helpers
def task_ids(first: int, count: int) -> list[int]:
    return list(range(first, first + count))


def shard(ids: list[int], rank: int, world: int) -> list[int]:
    """Disjoint round-robin shard (with 4 families and 2 workers each worker sees 2 families,
    which halves the per-worker prompt-state cache)."""
    return ids[rank::world] if world > 1 else list(ids)


def report_rounds(n_tasks: int, world: int, report_every: int) -> int:
    """Number of ``ray.train.report`` calls, identical on every worker."""
    per_worker = math.ceil(n_tasks / max(world, 1))
    return max(1, math.ceil(per_worker / max(report_every, 1)))


def tenant_for(task, tenant_mode: str) -> str:
    return task.tenant if tenant_mode == "task" else f"lora-{task.family}"


# ------------------------------------------------------------------------------------------- worker
def publish_adapter(registry, task, adapter_dir: Path, record: dict, tenant_mode: str) -> str:
    """Publish one adapter directory (idempotent: skipped when the latest version has the same weights)."""
    from cluster.registry import NotFound, RegistryError

    tenant = tenant_for(task, tenant_mode)
    try:
        registry.get_tenant(tenant)
    except NotFound:
        try:
            registry.create_tenant(tenant, display_name=tenant,
                                   description=task.description if tenant_mode == "task" else
                                   f"LoRA codebook tenants of family {task.family}")
        except RegistryError:
            pass  # created concurrently by another worker
    files = {f: (adapter_dir / f).read_bytes() for f in ADAPTER_FILES}
    files["README.md"] = f"# {task.title}\n\n{task.description}\n".encode()
    digest = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    try:
        latest = registry.resolve(tenant, "adapter", task.name)
        if latest.files.get("adapter_model.safetensors") and \
                latest.files["adapter_model.safetensors"].sha256 == digest:
            return str(latest.ref)
    except NotFound:
        pass
    m = record["metrics"]
    metadata = {"description": task.description, "title": task.title, "family": task.family,
                "task_id": task.task_id, "task_seed": task.seed, "base_model": record["base_model"],
                "metrics": {k: m.get(k) for k in ("accuracy", "heldout_accuracy", "test_accuracy", "base_accuracy",
                                                  "base_heldout_accuracy", "base_test_accuracy",
                                                  "choice_accuracy", "chance")},
                "answer_vocab": task.answer_vocab, "fingerprint": record["fingerprint"]}
    return str(registry.publish(tenant, "adapter", task.name, files, metadata))


FAILURES_DIR = ".failures"


def failure_path(out: Path, task_name: str) -> Path:
    """Where a worker records why a task failed (read by the driver; removed when the task succeeds)."""
    return out / FAILURES_DIR / f"{task_name}.json"


def collect_failures(out: Path, task_names: list[str]) -> list[dict]:
    """Every worker's recorded failures among ``task_names`` (rank, task, error), in task order."""
    rows = []
    for name in task_names:
        path = failure_path(out, name)
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


class JobFailed(RuntimeError):
    """Some tasks of the job failed on some worker: the job exits non-zero and lists them all."""


def run_shard(config: dict, rank: int, world: int, report=None) -> dict:
    """Train (or skip) this worker's shard; call ``report`` the same number of times on every rank."""
    import torch

    from cluster.models import ResolvedModel, load_model
    from compression.codebook.tasks import TrainConfig, make_task

    torch.set_num_threads(int(config["threads"]))
    model_rec = config["model"]
    resolved = ResolvedModel(id=model_rec["id"], path=Path(model_rec["path"]), content_hash=model_rec["content_hash"],
                             source=model_rec["source"], num_layers=model_rec["num_layers"],
                             hidden_size=model_rec["hidden_size"])
    cfg = TrainConfig(**config["train"])
    out = Path(config["out"])
    ids = config["task_ids"]
    mine = shard(ids, rank, world)
    every = int(config["report_every"])
    rounds = report_rounds(len(ids), world, every)
    registry = None
    if config.get("publish"):
        from cluster.registry import Registry
        from cluster.validators import install_validators

        install_validators()
        registry = Registry(config["store"])
    log.info("lora.shard.start", rank=rank, world=world, tasks=len(mine), rounds=rounds, model=resolved.id,
             out=str(out), threads=torch.get_num_threads())
    model = tok = None
    stats = {"rank": rank, "trained": 0, "skipped": 0, "failed": 0, "published": 0, "accuracy": []}
    t_start = time.perf_counter()
    for r in range(rounds):
        for task_id in mine[r * every:(r + 1) * every]:
            task = make_task(task_id, seed=config["seed"], num_keys=config["num_keys"])
            fp = fingerprint(task.model_dump(), cfg.model_dump(), resolved.content_hash)
            adapter_dir = out / task.name
            try:
                record = None if config.get("force") else reusable_record(adapter_dir, fp)
                if record is not None:
                    stats["skipped"] += 1
                    log.info("lora.task.skipped", rank=rank, task_id=task_id, name=task.name,
                             accuracy=record["metrics"]["accuracy"])
                else:
                    if model is None:
                        with Timer() as t:
                            model, tok = load_model(resolved)
                        log.info("lora.model.loaded", rank=rank, model=resolved.id, seconds=t.seconds)
                    record = train_and_write(model, tok, task, cfg, adapter_dir, resolved.to_record(), fp)
                    metrics = record["metrics"]
                    stats["trained"] += 1
                    log.info("lora.task.trained", rank=rank, task_id=task_id, name=task.name, family=task.family,
                             accuracy=metrics["accuracy"], heldout_accuracy=metrics["heldout_accuracy"],
                             test_accuracy=metrics["test_accuracy"],
                             base_accuracy=metrics["base_accuracy"], steps=metrics["steps"],
                             seconds=metrics["seconds_total"], cpu_seconds=metrics["cpu_seconds_total"])
                stats["accuracy"].append(record["metrics"]["accuracy"])
                if registry is not None:
                    ref = publish_adapter(registry, task, adapter_dir, record, config["tenant_mode"])
                    stats["published"] += 1
                    log.info("lora.task.published", rank=rank, task_id=task_id, ref=ref)
                failure_path(out, task.name).unlink(missing_ok=True)
            except Exception as exc:  # one bad task must not lose the other adapters of the shard
                stats["failed"] += 1
                log.error("lora.task.failed", rank=rank, task_id=task_id, error=repr(exc), exc_info=True)
                path = failure_path(out, task.name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"rank": rank, "task_id": task_id, "task": task.name,
                                            "error": repr(exc)[:2000]}))
        acc = stats["accuracy"]
        metrics = {"round": r + 1, "rounds": rounds, "rank": rank,
                   "done": min(len(mine), (r + 1) * every), "of": len(mine),
                   "trained": stats["trained"], "skipped": stats["skipped"], "failed": stats["failed"],
                   "mean_accuracy": round(sum(acc) / len(acc), 4) if acc else float("nan"),
                   "elapsed_s": round(time.perf_counter() - t_start, 1)}
        log.info("lora.progress", **metrics)
        if report is not None:
            report(metrics)
    acc = stats.pop("accuracy")
    stats.update(n=len(mine), mean_accuracy=round(sum(acc) / len(acc), 4) if acc else None,
                 seconds=round(time.perf_counter() - t_start, 1))
    return stats


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point: one independent shard per worker (no process group is used)."""
    import ray.train

    ctx = ray.train.get_context()
    return run_shard(config, ctx.get_world_rank(), ctx.get_world_size(), report=ray.train.report)


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from compression.codebook.tasks import TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train_jobs.lora_adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--model", default=None, help="base model: smollm2-135m, tiny-random or a local HF directory "
                   "(default: settings.default_model)")
    g.add_argument("--num-adapters", type=int, default=100, help="number of tasks/adapters (default 100)")
    g.add_argument("--first-task", type=int, default=0, help="first task id (default 0)")
    g.add_argument("--seed", type=int, default=0, help="task-generator seed (facts per tenant; default 0)")
    g.add_argument("--num-keys", type=int, default=12, help="keys (facts) per tenant codebook (default 12)")
    g = p.add_argument_group("LoRA training (defaults measured on SmolLM2-135M, 1 core)")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default {d.rank})")
    g.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha})")
    g.add_argument("--layers", type=int, default=d.num_layers,
                   help=f"adapt the top N decoder layers (layers_to_transform; default {d.num_layers})")
    g.add_argument("--modules", default=",".join(d.target_modules),
                   help=f"comma-separated target modules (default {','.join(d.target_modules)})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"max optimiser steps (default {d.steps})")
    g.add_argument("--stop-loss", type=float, default=d.stop_loss,
                   help=f"stop once an epoch is all-correct with mean loss below this (default {d.stop_loss})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    g.add_argument("--train-seed", type=int, default=d.seed, help="LoRA init / batch order seed (default 0)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast in the adapted layers")
    g.add_argument("--no-split-forward", action="store_true",
                   help="disable the cached lower-layer states (full forward per step; slow, for checks)")
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, default=2,
                   help="Ray Train workers, each training a disjoint shard sequentially; 0 = local mode "
                        "in the driver (default 2)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU resources per worker (default 1)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    g.add_argument("--wait-for-resources", type=float, default=DEFAULT_WAIT_S,
                   help=f"seconds to wait for the workers' CPUs before failing with what is missing "
                        f"(default {DEFAULT_WAIT_S:g})")
    g.add_argument("--report-every", type=int, default=5,
                   help="tasks per ray.train.report round (report is a barrier across workers; default 5)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS or start a local Ray instance)")
    g.add_argument("--storage-path", default=None, help="Ray Train run storage (default <out>/.ray-train)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default ~/.cache/atelier/lora-adapters/<model>/)")
    g.add_argument("--force", action="store_true", help="retrain adapters even if present in --out")
    g.add_argument("--publish", action="store_true", help="publish every adapter to the artifact registry")
    g.add_argument("--store", default=None, help="registry store URI for --publish (default: settings store)")
    g.add_argument("--tenant-mode", choices=("task", "family"), default="task",
                   help="registry tenant per task (lora-tNNNN) or per family (lora-<family>); default task")
    return p


def train_config_from_args(args):
    from compression.codebook.tasks import TrainConfig

    return TrainConfig(rank=args.rank, alpha=args.alpha, num_layers=args.layers,
                       target_modules=[m.strip() for m in args.modules.split(",") if m.strip()],
                       steps=args.steps, stop_loss=args.stop_loss, lr=args.lr, batch_size=args.batch_size,
                       seed=args.train_seed, bf16=args.bf16, split_forward=not args.no_split_forward)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from cluster.models import resolve_model
    from cluster.settings import load_settings
    from compression.codebook.tasks import make_task

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = load_settings()
    resolved = resolve_model(args.model, settings)
    out = Path(args.out).expanduser().resolve() if args.out else default_out_dir(resolved.id, settings.home)
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config_from_args(args)
    ids = task_ids(args.first_task, args.num_adapters)
    config = {"model": resolved.to_json(), "train": cfg.model_dump(), "out": str(out), "task_ids": ids,
              "seed": args.seed, "num_keys": args.num_keys, "threads": args.threads,
              "report_every": args.report_every, "force": args.force, "publish": args.publish,
              "store": args.store or settings.store_uri, "tenant_mode": args.tenant_mode}
    log.info("lora.job.start", model=resolved.id, adapters=len(ids), workers=args.workers, out=str(out),
             publish=args.publish, train=cfg.model_dump())
    names = [make_task(i, seed=args.seed, num_keys=args.num_keys).name for i in ids]
    for name in names:  # failures of an earlier run of these tasks are retried, not reported again
        failure_path(out, name).unlink(missing_ok=True)
    with Timer() as t:
        result = fit(config, args.workers, args.cpus_per_worker, args.address,
                     args.storage_path or str(out / ".ray-train"), args.wait_for_resources)
    failures = collect_failures(out, names)
    run = {"out": str(out), "task_ids": [ids[0], ids[-1]] if ids else [], "seed": args.seed, "num_keys": args.num_keys,
           "workers": args.workers, "seconds": t.seconds, "train_config": cfg.model_dump(),
           "rank0": result}
    index = build_index(out, resolved.to_record(), run)
    log.info("lora.job.done", out=str(out), seconds=t.seconds, **{
        "adapters": index["summary"]["adapters"], "mean_accuracy": index["summary"]["accuracy"].get("mean"),
        "min_accuracy": index["summary"]["accuracy"].get("min"),
        "mean_base_accuracy": index["summary"]["base_accuracy"].get("mean")})
    if failures:
        for f in failures:
            log.error("lora.job.task_failed", **f)
        raise JobFailed(f"{len(failures)} of {len(ids)} tasks failed (on ranks {sorted({f['rank'] for f in failures})}): "
                        + "; ".join(f"{f['task']}: {f['error']}" for f in failures[:10])
                        + ("; ..." if len(failures) > 10 else "") + f" (all of them: {out / FAILURES_DIR})")
    return index


def fit(config: dict, workers: int, cpus_per_worker: float, address: str | None, storage_path: str,
        wait_for_resources: float = DEFAULT_WAIT_S):
    """Run the shards under Ray Train; returns rank 0's shard summary (``result.return_value``).
    Every worker's failed tasks are recorded under ``<out>/.failures`` (see :func:`collect_failures`)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers > 0 and not ray.is_initialized():
        ray.init(address=address)
    if workers > 0:
        require_cpus(CpuDemand("train_jobs.lora_adapters workers", workers, cpus_per_worker, "--cpus-per-worker"),
                     wait_for_resources)
    scaling = ScalingConfig(num_workers=workers, use_gpu=False,
                            resources_per_worker={"CPU": cpus_per_worker} if workers > 0 else None)
    name = f"lora-adapters-{config['model']['id'].replace(':', '-')}"
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=config, scaling_config=scaling,
                           run_config=RunConfig(name=name, storage_path=storage_path))
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value


if __name__ == "__main__":
    try:
        index = main()
    except JobFailed as exc:
        sys.exit(f"lora_adapters: FAILED: {exc}")
    print(json.dumps({"out": index["run"]["out"], "summary": index["summary"]}, indent=2), file=sys.stdout)
