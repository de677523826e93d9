"""Ray job: Llamdex connectors for tenants' experts, one Ray Train run per tenant, in parallel.

This is the *server side* of Llamdex. Its only inputs are registry artifacts the tenant already
published: the public **schema** and the **expert** (``expert.json`` + ``expert.safetensors``).
There is no option for data files, and :class:`ConnectorsJob` forbids unknown fields, so private
data cannot enter this job. The worker builds synthetic rows and questions from the schema,
trains the server's synthetic expert, caches the frozen LLM's hidden states, trains the encoder
(stage 1) and decoder (stage 2) (see :mod:`llamdex.pipeline`), checks that the tenant's expert
fits the connectors, and publishes ``<tenant>/connectors/<name>`` (same name as the expert, so
the router serves ``<tenant>/<name>`` with the tenant's real expert swapped in).

    ray job submit -- python -m train_jobs.connectors --tenant acme --name survival
    ray job submit -- python -m train_jobs.connectors --jobs jobs.yaml --parallel 2
    atelier connectors train --tenant acme --name survival     (same flags)

A jobs file is a YAML/JSON list of :class:`ConnectorsJob` objects. Progress (stage, epoch,
loss) is reported to Ray Train (dashboard) and logged as JSON lines.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.logs import get_logger
from cluster.resources import DEFAULT_WAIT_S, CpuDemand, require_cpus

log = get_logger("connectors")
DEFAULT_LAYER = 16
"""Insertion layer k for SmolLM2-135M (30 layers); models with fewer layers use their last one."""


def _config_fields() -> set[str]:
    from llamdex.pipeline import ConnectorsConfig

    return {f.name for f in dataclasses.fields(ConnectorsConfig)}


class ConnectorsJob(BaseModel):
    """One tenant's connectors request: registry references only (never data)."""

    model_config = ConfigDict(extra="forbid")
    tenant: str
    name: str = Field(description="the expert's name; connectors are published under the same name")
    expert_version: int | None = Field(None, description="expert version to fit (default: latest)")
    model: str | None = Field(None, description="base model (default: ATELIER_DEFAULT_MODEL)")
    config: dict[str, Any] = Field(default_factory=dict, description="llamdex.pipeline.ConnectorsConfig overrides")

    @field_validator("config")
    @classmethod
    def _known_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - _config_fields())
        if unknown:
            raise ValueError(f"unknown ConnectorsConfig fields {unknown}; fix: use {sorted(_config_fields())}")
        return v


def resolve_inputs(registry, job: ConnectorsJob) -> tuple[Any, Any, Any]:
    """(schema, expert spec, expert manifest) from the registry; the expert must fit its schema."""
    from cluster.registry import NotFound
    from cluster.validators import check_expert_for_tenant
    from llamdex.expert_spec import ExpertSpec
    from llamdex.schema import load_schema

    try:
        manifest = registry.resolve(job.tenant, "expert", job.name, job.expert_version)
    except NotFound:
        raise ValueError(f"name: tenant {job.tenant!r} has no expert {job.name!r}"
                         f"{'' if job.expert_version is None else f' version {job.expert_version}'}; fix: publish "
                         "it first (train_jobs.experts or POST /v1/tenants/<tenant>/experts/<name>)") from None
    files = {f: registry.read_file(manifest, f) for f in ("expert.json", "expert.safetensors")}
    schema_name = check_expert_for_tenant(registry, job.tenant, files)
    schema = load_schema(registry.read_file(registry.resolve(job.tenant, "schema", schema_name), "schema.json")
                         .decode("utf-8"))
    return schema, ExpertSpec.model_validate_json(files["expert.json"]), manifest


def connectors_config(job: ConnectorsJob, num_layers: int):
    """ConnectorsConfig for this job: defaults, the model-dependent layer, then the job's overrides."""
    from llamdex.pipeline import ConnectorsConfig

    layer = job.config.get("layer", DEFAULT_LAYER if DEFAULT_LAYER < num_layers else num_layers - 1)
    return ConnectorsConfig(**{**job.config, "layer": layer})


def train_loop(config: dict) -> dict:
    """Ray Train worker: read schema + expert from the registry, train, check, publish connectors."""
    import ray.train
    import torch

    from cluster.models import load_model, resolve_model
    from cluster.registry import Registry
    from llamdex.connectors_io import save_connectors
    from llamdex.expert import load_expert
    from llamdex.pipeline import train_connectors

    torch.set_num_threads(int(config["threads"]))
    job = ConnectorsJob.model_validate(config["job"])
    registry = Registry(config["store"])
    schema, expert_spec, expert_manifest = resolve_inputs(registry, job)
    resolved = resolve_model(job.model)
    model, tok = load_model(resolved)
    cfg = connectors_config(job, resolved.num_layers)
    start = time.perf_counter()

    def progress(r) -> None:
        if r.stage == "cache" and r.epoch != r.epochs and r.epoch % (16 * cfg.cache_batch) >= cfg.cache_batch:
            return
        metrics = {"stage": r.stage, "step": r.epoch, "of": r.epochs, "seconds": round(time.perf_counter() - start, 1)}
        if r.loss == r.loss:  # not NaN
            metrics["loss"] = round(r.loss, 5)
        log.info("connectors.progress", tenant=job.tenant, name=job.name, **metrics)
        ray.train.report(metrics)

    trained = train_connectors(model, tok, schema, model_id=resolved.id, model_hash=resolved.content_hash,
                               config=cfg, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        expert_dir, out = Path(tmp) / "expert", Path(tmp) / "connectors"
        expert_dir.mkdir()
        for fname in ("expert.json", "expert.safetensors"):
            (expert_dir / fname).write_bytes(registry.read_file(expert_manifest, fname))
        tenant_expert, spec = load_expert(expert_dir, schema=schema)
        from llamdex.insertion import Bundle

        Bundle(trained.encoder, trained.decoder, trained.expert, trained.spec,
               trained.spec.codec()).with_expert(tenant_expert, spec)  # raises if it does not fit
        save_connectors(trained.encoder, trained.decoder, trained.spec, out)
        files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    report = trained.spec.training
    meta = {"description": schema.description, "expert_version": expert_manifest.version,
            "base_model": resolved.to_record(), "layer": cfg.layer, "num_slots": cfg.num_slots,
            "heldout_synthetic": report.stage2 if report else {}, "seconds": report.seconds if report else {},
            "epsilon": expert_spec.dp.epsilon}
    ref = registry.publish(job.tenant, "connectors", job.name, files, meta)
    return {"ref": str(ref), "seconds": round(time.perf_counter() - start, 1), "layer": cfg.layer,
            "end_to_end_accuracy": meta["heldout_synthetic"].get("end_to_end_accuracy"),
            "teacher_forced_accuracy": meta["heldout_synthetic"].get("teacher_forced_accuracy")}


def run_one(job: ConnectorsJob, store: str, storage: Path, cpus: float, threads: int) -> dict:
    """One tenant = one Ray Train run with one worker (loads the base model once)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job.model_dump(), "store": store, "threads": threads},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=f"connectors-{job.tenant}-{job.name}-{int(time.time())}",
                                                storage_path=str(storage)))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{job.tenant}/{job.name}: {result.error}")
    return {**result.return_value, "job_seconds": round(time.perf_counter() - start, 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_jobs.connectors", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", help="YAML/JSON list of jobs (fields of ConnectorsJob)")
    p.add_argument("--tenant", help="tenant id")
    p.add_argument("--name", help="the tenant's expert name (connectors get the same name)")
    p.add_argument("--expert-version", type=int, help="expert version (default: latest)")
    p.add_argument("--model", help="base model (default: ATELIER_DEFAULT_MODEL)")
    p.add_argument("--layer", type=int, help=f"insertion layer k (default {DEFAULT_LAYER}, or the model's last)")
    p.add_argument("--time-budget", type=float,
                   help="seconds for the whole training (cache <= 40 %%, then mostly the encoder; "
                   "llamdex.pipeline.BUDGET_SHARES; default: no budget)")
    p.add_argument("--config", default="{}", help="JSON of further llamdex.pipeline.ConnectorsConfig overrides, "
                   "e.g. '{\"train_questions\": 1000, \"enc_epochs\": 20}'")
    p.add_argument("--parallel", type=int, default=2, help="tenants trained at the same time (default 2)")
    p.add_argument("--cpus-per-tenant", type=float, default=1.0, help="Ray CPUs per tenant's worker (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--wait-for-resources", type=float, default=DEFAULT_WAIT_S,
                   help=f"seconds to wait for a free worker's CPUs before failing with what is missing "
                        f"(default {DEFAULT_WAIT_S:g})")
    p.add_argument("--store", help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--storage-path", help="Ray Train run storage (default: a temp dir)")
    return p


def jobs_from_args(args: argparse.Namespace) -> list[ConnectorsJob]:
    """The jobs file, or one job from the flags (flags override the file's config for every job)."""
    overrides = json.loads(args.config)
    if args.layer is not None:
        overrides["layer"] = args.layer
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget
    if args.jobs:
        raw = yaml.safe_load(Path(args.jobs).read_text())
        if not isinstance(raw, list):
            raise ValueError(f"--jobs: {args.jobs} must hold a list of jobs; fix: write a YAML/JSON list")
        return [ConnectorsJob.model_validate({**j, "config": {**j.get("config", {}), **overrides}}) for j in raw]
    if not (args.tenant and args.name):
        raise ValueError("give --jobs FILE or both --tenant and --name")
    return [ConnectorsJob(tenant=args.tenant, name=args.name, expert_version=args.expert_version, model=args.model,
                          config=overrides)]


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    import ray

    from cluster.registry import Registry
    from cluster.settings import load_settings

    jobs = jobs_from_args(args)
    store = args.store or load_settings().store_uri
    registry = Registry(store)
    for job in jobs:  # fail fast, before any Ray Train run starts
        resolve_inputs(registry, job)
    ray.init(ignore_reinit_error=True)
    require_cpus(CpuDemand("train_jobs.connectors worker", 1, args.cpus_per_tenant, "--cpus-per-tenant"),
                 args.wait_for_resources)
    storage = Path(args.storage_path or tempfile.mkdtemp(prefix="atelier-connectors-"))
    log.info("connectors.start", jobs=len(jobs), parallel=args.parallel)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = {pool.submit(run_one, j, store, storage, args.cpus_per_tenant, args.threads): j for j in jobs}
        for fut in concurrent.futures.as_completed(futures):
            job, out = futures[fut], fut.result()
            row = {"tenant": job.tenant, "name": job.name, **out}
            log.info("connectors.done", **row)
            results.append(row)
    print(json.dumps(results, indent=2), file=sys.stdout)
    return results


if __name__ == "__main__":
    main()
