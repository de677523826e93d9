"""Ray job: tenants' DP experts, one Ray Train run per tenant, many tenants in parallel.

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
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.logs import get_logger

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
    delta: float | None = Field(None, description="δ; default 1/len(train) rounded down to a power of 10")
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    hidden_sizes: list[int] = [400, 200]

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


def train_loop(config: dict) -> dict:
    """Ray Train worker: read the private table, DP-train, save the expert, report per epoch."""
    import ray.train
    import torch

    from llamdex.codec import FeatureCodec
    from llamdex.dp_training import train_expert
    from llamdex.expert import ExpertArch, ExpertSpec, save_expert

    torch.set_num_threads(1)
    job = ExpertJob.model_validate(config["job"])
    schema, features, labels = load_private_table(job)
    x = FeatureCodec(schema).encode(features)
    delta = job.delta or 10 ** math.floor(math.log10(1 / len(x)))
    arch = ExpertArch.from_schema(schema, hidden_sizes=job.hidden_sizes)

    def progress(report) -> None:
        ray.train.report({"epoch": report.epoch, "loss": report.loss, "epsilon": report.epsilon or 0.0})

    model, ledger = train_expert(x, labels, arch, job.epsilon, delta, job.epochs, job.batch_size, job.lr,
                                 job.max_grad_norm, job.seed, progress=progress)
    with torch.no_grad():
        train_acc = float(((model(torch.from_numpy(x)) > 0.5).long().squeeze(-1) == torch.from_numpy(labels)).float()
                          .mean()) if arch.output_size == 1 else float(
            (model(torch.from_numpy(x)).argmax(-1) == torch.from_numpy(labels)).float().mean())
    out = Path(config["out_dir"])
    spec = save_expert(model, ExpertSpec.build(schema, arch, ledger), out)
    return {"out_dir": str(out), "ledger": spec.dp.model_dump(), "train_accuracy": train_acc, "rows": len(x)}


def run_one(job: ExpertJob, storage: Path, out_dir: Path) -> dict:
    """One tenant = one Ray Train run (1 worker; private data stays on it)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job.model_dump(), "out_dir": str(out_dir)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
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
    from cluster.validators import check_expert_for_tenant
    from llamdex.schema import load_schema

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
    eps = out["ledger"]["epsilon"]
    meta = {"description": schema.description, "epsilon": eps, "train_accuracy": out["train_accuracy"]}
    return str(registry.publish(job.tenant, "expert", job.name, files, meta))


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
    p.add_argument("--parallel", type=int, default=2, help="tenants trained at the same time")
    p.add_argument("--publish", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--store", help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--out", help="where expert directories are kept (default: a temp dir)")
    args = p.parse_args(argv)
    if args.jobs:
        jobs = [ExpertJob.model_validate(j) for j in yaml.safe_load(Path(args.jobs).read_text())]
    else:
        jobs = [ExpertJob(tenant=args.tenant, name=args.name, schema_path=args.schema_path, data=args.data,
                          paper_dataset=args.paper_dataset, epsilon=args.epsilon, delta=args.delta,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)]
    import ray

    ray.init(ignore_reinit_error=True)
    out_root = Path(args.out or tempfile.mkdtemp(prefix="atelier-experts-"))
    storage = out_root / "ray-train"
    log.info("experts.start", jobs=len(jobs), parallel=args.parallel)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(run_one, j, storage, out_root / j.tenant / j.name): j for j in jobs}
        for fut in concurrent.futures.as_completed(futures):
            job, out = futures[fut], fut.result()
            ref = publish(job, out, args.store) if args.publish else None
            row = {"tenant": job.tenant, "name": job.name, "ref": ref, **out}
            log.info("experts.done", **{k: v for k, v in row.items() if k != "ledger"}, epsilon=out["ledger"]["epsilon"])
            results.append(row)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
