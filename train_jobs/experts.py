"""Ray job: tenants' DP experts, one Ray Train run per tenant, many tenants in parallel.

(Same idea at two layers: this is the job; the expert, its file format and its DP-SGD training are
``llamdex.expert``, ``llamdex.expert_spec`` and ``llamdex.dp_training``.)

This is the *tenant side* of Llamdex: the private CSV is read only inside the tenant's Train
worker; what leaves it is the expert (``expert.json`` with the privacy ledger +
``expert.safetensors``), published to the registry under the tenant.

    ray job submit -- python -m train_jobs.experts --jobs jobs.yaml
    ray job submit -- python -m train_jobs.experts --tenant acme --name titanic \
        --schema examples/schemas/titanic.json --data private.csv --epsilon 1
    atelier expert train ...   (same flags)

A jobs file is a YAML/JSON list of :class:`ExpertJob` objects. ``--paper-dataset titanic``
uses the 80 % training split of a paper dataset as stand-in private data (for demos and the
accuracy benchmark).

What leaves the worker (published to the registry, reported to Ray Train, returned to the
driver) is DP or public only: the weights, the ledger (ε spent, δ, noise multiplier, sample
rate, steps, accountant, RNG source), the schema, and the row count only with
``--publish-row-count``. The expert's accuracy and losses on the private rows are not DP: the
worker prints them to its own log (the tenant's job output) and nothing else carries them.
DP noise comes from fresh OS entropy per run; ``--reproducible-seed`` (tests, benchmarks only)
makes it replayable and the ledger then says ``secure_rng: false``. δ defaults to the largest
power of ten <= 1/(10 n). See docs/privacy.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.logs import get_logger
from cluster.resources import DEFAULT_WAIT_S, CpuDemand, require_cpus
from train_jobs.fanout import each_completed

log = get_logger("experts")
ROOT = Path(__file__).resolve().parent.parent


class ExpertJob(BaseModel):
    """One tenant's expert training request."""

    model_config = ConfigDict(extra="forbid")
    tenant: str
    name: str
    schema_path: str = Field(description="public schema JSON (published to the registry if missing)")
    data: str | None = Field(None, description="private CSV: schema feature columns + the target column")
    paper_dataset: str | None = Field(None, description="titanic | wine | nursery | bank (train split)")
    epsilon: float | None = Field(1.0, description="target ε; null or 'inf' = no DP (labelled as such)")
    delta: float | None = Field(None, description="δ; default: the largest power of ten <= 1/(10 n)")
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    reproducible_seed: int | None = Field(
        None, description="fix the DP noise and sampling for a reproducible run (tests/benchmarks): anyone who "
                          "knows it can replay the noise; the ledger records secure_rng=false. Default: fresh "
                          "OS entropy per run, never recorded")
    publish_row_count: bool = Field(False, description="the tenant agrees to publish its training row count")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus privacy accountant")
    hidden_sizes: list[int] = [400, 200]

    @model_validator(mode="before")
    @classmethod
    def _no_plain_seed(cls, data):
        if isinstance(data, dict) and "seed" in data:
            raise ValueError("seed: no longer accepted, DP noise now comes from fresh OS entropy per run; fix: "
                             "remove it, or set reproducible_seed for a replayable (not secure) test run")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ExpertJob:
        if (self.data is None) == (self.paper_dataset is None):
            raise ValueError("give exactly one of data (a CSV path) or paper_dataset")
        if self.epsilon is not None and (math.isinf(self.epsilon) or self.epsilon <= 0):
            if math.isinf(self.epsilon):
                self.epsilon = None
            else:
                raise ValueError("epsilon must be > 0 (or null / inf for no DP)")
        return self


def load_private_table(job: ExpertJob):
    """(schema, features frame, labels) of the tenant's private training data. Worker-side only."""
    import pandas as pd

    from llamdex.codec import FeatureCodec
    from llamdex.datasets import load_paper_dataset, normalize_frame
    from llamdex.schema import load_schema

    schema = load_schema(Path(job.schema_path))
    if job.paper_dataset:
        _, train, _ = load_paper_dataset(job.paper_dataset, ROOT / "examples" / "datasets", schema)
        return schema, train[[f.name for f in schema.features]], train[schema.target.name].to_numpy()
    df = pd.read_csv(job.data)
    missing = [c for c in [*(f.name for f in schema.features), schema.target.name] if c not in df.columns]
    if missing:
        raise ValueError(f"data: {job.data} lacks columns {missing}; fix: name the CSV columns as in the schema")
    labels = FeatureCodec(schema).encode_labels([str(v) for v in df[schema.target.name]])
    return schema, normalize_frame(df, schema), labels


def epoch_report(report) -> dict:
    """What one epoch may tell Ray Train (and so the dashboard): progress and ε spent, nothing
    computed from the rows (the loss is not DP)."""
    out = {"epoch": report.epoch, "epochs": report.epochs, "steps": report.steps, "dp": report.epsilon is not None}
    if report.epsilon is not None:
        out["epsilon_spent"] = report.epsilon
    return out


def train_and_save(job: ExpertJob, out_dir: Path, report: Callable[[dict], None]) -> dict:
    """Tenant side: read the private table, train (DP unless ε is null), save the expert.

    ``report`` receives :func:`epoch_report` dicts. The return value is what may leave the
    worker: the expert's directory, its ledger and (if the tenant agreed) the row count. The
    training accuracy and final loss on the private rows are printed here and go nowhere else.
    """
    import numpy as np

    from llamdex.codec import FeatureCodec
    from llamdex.dp_training import default_delta, train_expert
    from llamdex.expert import ExpertArch, ExpertSpec, predict_proba, save_expert

    schema, features, labels = load_private_table(job)
    x = FeatureCodec(schema).encode(features)
    delta = job.delta or default_delta(len(x))
    arch = ExpertArch.from_schema(schema, hidden_sizes=job.hidden_sizes)
    losses: list[float] = []

    def progress(r) -> None:
        losses.append(r.loss)
        report(epoch_report(r))

    model, ledger = train_expert(x, labels, arch, job.epsilon, delta, job.epochs, job.batch_size, job.lr,
                                 job.max_grad_norm, job.reproducible_seed, progress=progress,
                                 accountant=job.accountant)
    train_acc = float((predict_proba(model, x).argmax(axis=1) == labels).mean())
    print(f"[{job.tenant}/{job.name}] PRIVATE, not DP, never published: on the {len(x)} training rows the "
          f"expert's accuracy is {train_acc:.4f}; mean training loss per epoch "
          f"{np.round(losses, 4).tolist()}", flush=True)
    spec = save_expert(model, ExpertSpec.build(schema, arch, ledger), out_dir)
    out = {"out_dir": str(out_dir), "ledger": spec.dp.model_dump()}
    if job.publish_row_count:
        out["rows"] = len(x)
    return out


def train_loop(config: dict) -> dict:
    """Ray Train worker: :func:`train_and_save` reporting through ``ray.train.report``."""
    import ray.train
    import torch

    torch.set_num_threads(1)
    return train_and_save(ExpertJob.model_validate(config["job"]), Path(config["out_dir"]), ray.train.report)


def resolve_paths(job: ExpertJob, cwd: Path | None = None) -> ExpertJob:
    """The job with ``schema_path`` and ``data`` made absolute where the user typed them (the
    driver's working directory): a Train worker runs in its own run directory, so a relative path
    read there names another file or none. Raises ``ValueError`` naming the field if a file is missing."""
    cwd = cwd or Path.cwd()
    fixed = {}
    for field in ("schema_path", "data"):
        value = getattr(job, field)
        if value is None:
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (cwd / path)
        if not path.is_file():
            flag = "--schema" if field == "schema_path" else "--data"
            raise ValueError(f"{field}: no file {path} (from {value!r}, relative to {cwd}); fix: pass an existing "
                             f"path with {flag}, absolute or relative to where you run the job")
        fixed[field] = str(path.resolve())
    return job.model_copy(update=fixed)


def run_one(job: ExpertJob, storage: Path, out_dir: Path, cpus: float = 1.0) -> dict:
    """One tenant = one Ray Train run (1 worker of ``cpus`` CPUs; private data stays on it)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job.model_dump(), "out_dir": str(out_dir)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=f"expert-{job.tenant}-{job.name}-{int(time.time())}",
                                                storage_path=str(storage)))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{job.tenant}/{job.name}: {result.error}")
    return {**result.return_value, "seconds": round(time.perf_counter() - start, 1)}


def publish(job: ExpertJob, out: dict, store: str | None) -> str:
    """Publish schema (if new) and expert to the registry; returns the expert's ref."""
    from cluster.registry import NotFound, Registry
    from cluster.settings import load_settings
    from cluster.validators import check_expert_for_tenant, install_validators
    from llamdex.schema import load_schema

    install_validators()
    registry = Registry(store or load_settings().store_uri)
    try:
        registry.get_tenant(job.tenant)
    except NotFound:
        registry.create_tenant(job.tenant)
        log.info("experts.tenant_created", tenant=job.tenant, note="issue a key with `atelier keys issue`")
    schema = load_schema(Path(job.schema_path))
    schema_bytes = Path(job.schema_path).read_bytes()
    try:
        current = registry.resolve(job.tenant, "schema", schema.name)
        same = load_schema(registry.read_file(current, "schema.json").decode()).sha256() == schema.sha256()
    except NotFound:
        same = False
    if not same:
        registry.publish(job.tenant, "schema", schema.name, {"schema.json": schema_bytes})
    files = {f: (Path(out["out_dir"]) / f).read_bytes() for f in ("expert.json", "expert.safetensors")}
    check_expert_for_tenant(registry, job.tenant, files)
    return str(registry.publish(job.tenant, "expert", job.name, files, published_metadata(schema, out)))


def published_metadata(schema, out: dict) -> dict:
    """Registry metadata of a trained expert: public (schema description, the row count only if
    the tenant agreed) or DP (the ledger's headline numbers; the full ledger is in expert.json)."""
    ledger = out["ledger"]
    meta = {"description": schema.description, "schema_sha256": schema.sha256(), "dp": ledger["mechanism"] != "none",
            "epsilon": ledger["epsilon"], "delta": ledger["delta"], "secure_rng": ledger["secure_rng"]}
    if "rows" in out:
        meta["rows"] = out["rows"]
    return meta


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", help="YAML/JSON list of jobs (fields of ExpertJob)")
    p.add_argument("--tenant")
    p.add_argument("--name")
    p.add_argument("--schema", dest="schema_path")
    p.add_argument("--data", help="private CSV")
    p.add_argument("--paper-dataset", help="titanic | wine | nursery | bank (train split as private data)")
    p.add_argument("--epsilon", type=float, default=1.0, help="target ε (inf = no DP)")
    p.add_argument("--delta", type=float)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-sizes", default="400,200", help="expert MLP widths, comma-separated")
    p.add_argument("--reproducible-seed", type=int,
                   help="fix the DP noise/sampling (tests, benchmarks): replayable, NOT secure; the ledger records "
                        "secure_rng=false. Default: fresh OS entropy per run, never recorded")
    p.add_argument("--publish-row-count", action="store_true",
                   help="the tenant agrees to publish its training row count (registry metadata)")
    p.add_argument("--accountant", choices=["prv", "rdp"], default="prv", help="Opacus privacy accountant")
    p.add_argument("--parallel", type=int, default=2, help="tenants trained at the same time")
    p.add_argument("--worker-cpus", type=float, default=1.0,
                   help="Ray CPUs per tenant's training worker (default 1; 0.5 fits beside the demo's service on "
                        "a 2-core head: the worker trains single-threaded)")
    p.add_argument("--wait-for-resources", type=float, default=DEFAULT_WAIT_S,
                   help=f"seconds to wait for a free worker's CPUs before failing with what is missing "
                        f"(default {DEFAULT_WAIT_S:g})")
    p.add_argument("--publish", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--store", help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--out", help="where expert directories are kept (default: a temp dir)")
    args = p.parse_args(argv)
    if args.jobs:
        jobs = [ExpertJob.model_validate(j) for j in yaml.safe_load(Path(args.jobs).read_text())]
    else:
        jobs = [ExpertJob(tenant=args.tenant, name=args.name, schema_path=args.schema_path, data=args.data,
                          paper_dataset=args.paper_dataset, epsilon=args.epsilon, delta=args.delta,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          hidden_sizes=[int(h) for h in args.hidden_sizes.split(",")],
                          reproducible_seed=args.reproducible_seed, publish_row_count=args.publish_row_count,
                          accountant=args.accountant)]
    try:
        jobs = [resolve_paths(j) for j in jobs]
    except ValueError as exc:
        p.error(str(exc))
    import ray

    ray.init(ignore_reinit_error=True)
    require_cpus(CpuDemand("train_jobs.experts worker", 1, args.worker_cpus, "--worker-cpus"),
                 args.wait_for_resources)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="atelier-experts-"))
    storage = out_root / "ray-train"
    log.info("experts.start", jobs=len(jobs), parallel=args.parallel)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(run_one, j, storage, out_root / j.tenant / j.name, args.worker_cpus): j
                   for j in jobs}
        for job, out in each_completed(futures, "experts"):
            ref = publish(job, out, args.store) if args.publish else None
            row = {"tenant": job.tenant, "name": job.name, "ref": ref, **out}
            log.info("experts.done", **{k: v for k, v in row.items() if k != "ledger"}, epsilon=out["ledger"]["epsilon"])
            results.append(row)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
