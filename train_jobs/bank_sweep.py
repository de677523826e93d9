"""Ray job: the Tune sweep that (re)fits an adapter bank: rank r × clusters K × JD-Full/JD-Diag/lowrank, within a budget.

This module is the job's command line and its adapter sources (a directory of PEFT adapters, the
registry); the sweep itself is ``cluster.bank_tune``, the refit of a served bank
``cluster.bank_refit`` (shared with the service, which queues refits) and the choice of a bank
``compression.selection``.

Every trial compresses the whole adapter collection with one (r, K, method), then stores exactly
every adapter whose mean squared relative reconstruction error exceeds ``--budget``
(``compression.serve_within_budget``): every trial's bank serves every adapter within the budget,
and the trials differ in what that costs. The chosen bank is the *smallest* (parameters stored,
exact clusters included; ties: lower error); it is refitted once and, with ``--publish``,
published as ``system/bank/<--bank>`` so running replicas pick it up within seconds. Publishing
re-reads the latest bank under the registry lock and adds every adapter uploaded (or re-uploaded)
while the sweep ran, so a refit never drops an adapter. Writes ``sweep.json``, ``sweep.md`` and
``sweep.png`` (bank size vs error, one line per K and method) to ``--out``.

    # refit a pool's bank from the adapters it holds (what the service queues automatically)
    ray job submit -- python -m train_jobs.bank_sweep --bank-adapters --bank default --model smollm2-135m --publish
    # fit a bank for a directory of PEFT adapters (e.g. the LoRA job's output)
    ray job submit -- python -m train_jobs.bank_sweep --adapters ~/.cache/atelier/lora-adapters/smollm2-135m \
        --model smollm2-135m --ranks 4,8,16,32 --clusters 1,2,4,8 --methods full,diag
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import ray

from cluster.bank_refit import publish_refit, refit_bank
from cluster.bank_tune import run_sweep, write_report
from cluster.banks import adapter_sha256, load_registry_adapter, model_linear_shapes
from cluster.logs import get_logger
from cluster.models import resolve_model
from cluster.registry import Registry
from cluster.settings import load_settings
from cluster.validators import install_validators
from compression import DEFAULT_ERROR_BUDGET, collection_param_count, load_peft_adapter
from compression.selection import choose, fit_within_budget

log = get_logger("bank_sweep")


def load_collection(adapters_dir: Path | None, registry: Registry | None, model) -> tuple[list, dict[str, str]]:
    """Adapters to compress: PEFT dirs under ``adapters_dir`` or every tenant adapter in the registry; and
    the SHA-256 of each one's weights file (how a publish tells them from later uploads)."""
    shapes = model_linear_shapes(str(model.path))
    if adapters_dir is not None:
        found, shas = [], {}
        for d in sorted(p for p in adapters_dir.iterdir() if (p / "adapter_config.json").exists()):
            meta = json.loads((d / "task.json").read_text()) if (d / "task.json").exists() else {}
            tenant = meta.get("tenant") or meta.get("task", {}).get("tenant") or "local"
            name = meta.get("model_id") or f"{tenant}/{d.name}"  # served as model="<tenant>/<adapter>"
            found.append(load_peft_adapter(d, name=name, base_shapes=shapes))
            shas[name] = hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
        return found, shas
    pairs = [(t.id, m.name) for t in registry.list_tenants() for m in registry.list_artifacts(t.id, "adapter")]
    return ([load_registry_adapter(registry, t, n, model) for t, n in pairs],
            {f"{t}/{n}": adapter_sha256(registry, t, n) for t, n in pairs})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapters", help="directory of PEFT adapter directories (e.g. the LoRA job's output)")
    src.add_argument("--from-registry", action="store_true", help="every tenant adapter in the registry")
    src.add_argument("--bank-adapters", action="store_true",
                     help="the adapters bank --bank holds (a refit; what the service queues automatically)")
    p.add_argument("--model", default=None, help="base model (default: ATELIER_DEFAULT_MODEL)")
    p.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks r")
    p.add_argument("--clusters", default="1,2,4,8", help="comma-separated cluster counts K")
    p.add_argument("--methods", default="full,diag,lowrank",
                   help="full, diag, lowrank (JD-Full with Σ_i stored as a rank-R core), comma-separated")
    p.add_argument("--budget", type=float, default=DEFAULT_ERROR_BUDGET,
                   help="max mean squared relative reconstruction error at which an adapter is served compressed; "
                   f"above it, it is stored exactly (default compression.DEFAULT_ERROR_BUDGET = {DEFAULT_ERROR_BUDGET}, "
                   "measured in docs/bench/compression.md)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials in parallel")
    p.add_argument("--trial-cpus", type=float, default=1.0, help="Ray CPUs per trial (default 1)")
    p.add_argument("--max-rank", type=int, default=None, help="largest bank rank (a vLLM pool's vllm.max_lora_rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="publish the chosen bank to the registry")
    p.add_argument("--bank", default="default", help="bank name (a pool's `bank`, default: the pool name)")
    p.add_argument("--store", default=None, help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--out", default=None, help="results directory (default: <home>/bank-sweeps/<time>)")
    args = p.parse_args(argv)

    install_validators()
    settings = load_settings()
    store = args.store or settings.store_uri
    model = resolve_model(args.model, settings)
    out = Path(args.out) if args.out else settings.home / "bank-sweeps" / time.strftime("%Y%m%d-%H%M%S")
    ranks = [int(x) for x in args.ranks.split(",") if args.max_rank is None or int(x) <= args.max_rank]
    clusters, methods = [int(x) for x in args.clusters.split(",")], args.methods.split(",")
    ray.init(ignore_reinit_error=True)
    if args.bank_adapters:
        if not args.publish:
            raise SystemExit("--bank-adapters refits a served bank; add --publish (or use --from-registry to try)")
        report = refit_bank(store, args.bank, args.model or settings.default_model, args.budget,
                            tuple(ranks), tuple(clusters), tuple(methods), str(out), args.max_concurrent,
                            args.trial_cpus, args.max_rank, args.seed)
        print(report.get("verdict", report))
        return report
    registry = Registry(store)
    adapters, used = load_collection(Path(args.adapters).expanduser() if args.adapters else None, registry, model)
    if not adapters:
        raise SystemExit("no adapters found; fix: point --adapters at PEFT directories or publish some")
    log.info("sweep.start", adapters=len(adapters), ranks=ranks, clusters=clusters, methods=methods, budget=args.budget)
    rows = run_sweep(adapters, ranks, clusters, methods, out / "tune", args.max_concurrent, args.seed, args.budget,
                     args.trial_cpus)
    choice = choose(rows)
    report = write_report(out, rows, len(adapters), collection_param_count(adapters), args.budget, choice)
    print(report["verdict"])
    if choice and args.publish:
        _, bank = fit_within_budget(adapters, choice.rank, choice.clusters, choice.method, args.budget, args.seed,
                                    model)
        version, merged = publish_refit(registry, args.bank, bank, used, model, args.budget,
                                        {"refit": {"sweep": str(out), **choice.__dict__}}, args.max_rank)
        report.update(published_version=version, merged_after_refit=merged)
        print(f"published system/bank/{args.bank}@{version} ({len(merged)} concurrent uploads merged)")
    return report

