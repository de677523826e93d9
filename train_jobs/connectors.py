"""Ray job: Llamdex connectors for tenants' experts, one Ray Train run per tenant, in parallel.

(Same idea at two layers: this is the job; the connectors themselves are ``llamdex.connectors``,
``llamdex.encoder`` and their training ``llamdex.pipeline``.)

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

**Resume.** Each run is named after its fingerprint (tenant, expert, expert version, model,
config) under ``--storage-path`` (default ``<ATELIER_HOME>/runs/connectors``), and the trained
stage-1 encoder -- most of a run -- is a Ray Train checkpoint. A job killed after stage 1 and
submitted again resumes from it (:mod:`llamdex.stage_checkpoint`) and redoes only the synthetic
expert, the hidden-state cache and stage 2; ``--fresh`` ignores checkpoints. A finished run's
directory is removed, so the next identical submission trains anew.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.logs import get_logger
from cluster.resources import DEFAULT_WAIT_S, CpuDemand, require_cpus
from train_jobs.fanout import each_completed

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
    from cluster.validators import install_validators
    from llamdex.connectors_io import save_connectors
    from llamdex.expert import load_expert
    from llamdex.pipeline import OVERRUN_NOTE, train_connectors
    from llamdex.provenance import source_fingerprint
    from llamdex.stage_checkpoint import (
        EncoderCheckpoint,
        config_record,
        run_fingerprint,
        save_encoder_checkpoint,
    )

    torch.set_num_threads(int(config["threads"]))
    job = ConnectorsJob.model_validate(config["job"])
    install_validators()
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

    fingerprint = run_fingerprint(config_record(cfg), schema.model_dump_json(), resolved.content_hash)
    resume = None if config.get("fresh") else resume_point(fingerprint)

    def on_encoder(ckpt: EncoderCheckpoint) -> None:  # stage 1 done: what a resubmission resumes from
        with tempfile.TemporaryDirectory() as tmp:
            save_encoder_checkpoint(tmp, ckpt, fingerprint)
            ray.train.report({"stage": "encoder", "checkpoint": "encoder", "stage1_seconds": round(ckpt.seconds, 1),
                              "seconds": round(time.perf_counter() - start, 1)},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        log.info("connectors.checkpoint", tenant=job.tenant, name=job.name, stage="encoder",
                 stage1_seconds=round(ckpt.seconds, 1))

    trained = train_connectors(model, tok, schema, model_id=resolved.id, model_hash=resolved.content_hash,
                               config=cfg, progress=progress, resume=resume, on_encoder=on_encoder)
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
            "schema_sha256": schema.sha256(), "llamdex_code": source_fingerprint(),
            "base_model": resolved.to_record(), "layer": cfg.layer, "num_slots": cfg.num_slots,
            "heldout_synthetic": report.stage2 if report else {}, "seconds": report.seconds if report else {},
            "notes": report.notes if report else [], "epsilon": expert_spec.dp.epsilon}
    ref = registry.publish(job.tenant, "connectors", job.name, files, meta)
    return {"ref": str(ref), "seconds": round(time.perf_counter() - start, 1), "layer": cfg.layer,
            "resumed_from": "encoder" if resume is not None else None,
            "stage1_seconds_saved": round(resume.seconds, 1) if resume is not None else 0.0,
            "end_to_end_accuracy": meta["heldout_synthetic"].get("end_to_end_accuracy"),
            "teacher_forced_accuracy": meta["heldout_synthetic"].get("teacher_forced_accuracy"),
            "stage_seconds": {k: round(v, 1) for k, v in meta["seconds"].items()},
            "overrun": [n for n in meta["notes"] if n.startswith(OVERRUN_NOTE)]}


def resume_point(fingerprint: str):
    """The stage-1 checkpoint this run left before it was killed (Ray Train restores it), or None."""
    import ray.train

    from llamdex.stage_checkpoint import load_encoder_checkpoint

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as directory:
        resume = load_encoder_checkpoint(directory, fingerprint)
    if resume is not None:
        log.info("connectors.resume", stage="encoder", stage1_seconds_saved=round(resume.seconds, 1))
    return resume


def run_name(job: ConnectorsJob, expert_version: int) -> str:
    """Ray Train run name: the same job (tenant, expert version, model, config) -> the same run, so
    a resubmission finds the checkpoints its killed predecessor left."""
    record = {**job.model_dump(), "expert_version": expert_version}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    return f"connectors-{job.tenant}-{job.name}-{digest}"


def run_one(job: ConnectorsJob, store: str, storage: Path, cpus: float, threads: int, expert_version: int,
            fresh: bool = False) -> dict:
    """One tenant = one Ray Train run with one worker (loads the base model once); resumes from the
    stage-1 checkpoint a killed run of the same job left (unless ``fresh``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    name = run_name(job, expert_version)
    if fresh:
        shutil.rmtree(storage / name, ignore_errors=True)
    config = {"job": job.model_dump(), "store": store, "threads": threads, "fresh": fresh}
    trainer = TorchTrainer(train_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                           run_config=RunConfig(name=name, storage_path=str(storage)))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{job.tenant}/{job.name}: {result.error}")
    shutil.rmtree(storage / name, ignore_errors=True)  # finished: nothing left to resume
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
    p.add_argument("--storage-path", help="Ray Train run storage, where a killed run's checkpoint waits for "
                   "the resubmission (default: <ATELIER_HOME>/runs/connectors; shared storage on a multi-node cluster)")
    p.add_argument("--fresh", action="store_true", help="ignore a killed run's checkpoint and train from scratch")
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
    from cluster.validators import install_validators

    jobs = jobs_from_args(args)
    store = args.store or load_settings().store_uri
    install_validators()
    registry = Registry(store)
    versions = [resolve_inputs(registry, job)[2].version for job in jobs]  # fail fast, before any run starts
    ray.init(ignore_reinit_error=True)
    require_cpus(CpuDemand("train_jobs.connectors worker", 1, args.cpus_per_tenant, "--cpus-per-tenant"),
                 args.wait_for_resources)
    storage = Path(args.storage_path or load_settings().home / "runs" / "connectors").resolve()
    log.info("connectors.start", jobs=len(jobs), parallel=args.parallel)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = {pool.submit(run_one, j, store, storage, args.cpus_per_tenant, args.threads, v, args.fresh): j
                   for j, v in zip(jobs, versions, strict=True)}
        for job, out in each_completed(futures, "connectors"):
            row = {"tenant": job.tenant, "name": job.name, **out}
            log.info("connectors.done", **row)
            results.append(row)
    print(json.dumps(results, indent=2), file=sys.stdout)
    return results


if __name__ == "__main__":
    main()
