"""Ray Tune sweep that (re)fits an adapter bank: rank r × clusters K × JD-Full/JD-Diag/lowrank, within a budget.

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
import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from cluster.banks import (
    adapter_sha256,
    load_registry_adapter,
    model_linear_shapes,
    place_adapter,
    publish_bank,
    read_bank,
)
from cluster.logs import get_logger
from cluster.models import resolve_model
from cluster.registry import Registry
from cluster.settings import load_settings

log = get_logger("bank_sweep")


@dataclass(frozen=True)
class SweepChoice:
    rank: int
    clusters: int
    method: str
    mean_error: float
    bank_params: int
    exact_adapters: int


def load_collection(adapters_dir: Path | None, registry: Registry | None, model) -> tuple[list, dict[str, str]]:
    """Adapters to compress: PEFT dirs under ``adapters_dir`` or every tenant adapter in the registry; and
    the SHA-256 of each one's weights file (how a publish tells them from later uploads)."""
    import hashlib

    from compression import load_peft_adapter

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


def load_bank_collection(registry: Registry, bank_name: str, model) -> tuple[list, dict[str, str], int | None]:
    """The adapters a bank holds, as uploaded (latest registry versions), their weights' SHA-256, and the
    bank version they were read from."""
    bank, version = read_bank(registry, bank_name)
    if bank is None:
        return [], {}, None
    adapters, shas = [], {}
    for name in bank.adapters:
        tenant, artifact = name.split("/", 1)
        shas[name] = adapter_sha256(registry, tenant, artifact)
        adapters.append(load_registry_adapter(registry, tenant, artifact, model))
    return adapters, shas, version


def fit_within_budget(adapters: list, rank: int, clusters: int, method: str, budget: float, seed: int = 0,
                      model=None):
    """compress_collection + serve_within_budget: a bank serving every adapter within ``budget``."""
    from compression import compress_collection, serve_within_budget

    pin = {"base_model": model.id, "base_model_hash": model.content_hash} if model is not None else {}
    bank = compress_collection(adapters, rank=rank, clusters=min(clusters, len(adapters)), method=method,
                               seed=seed, **pin)
    return bank, serve_within_budget(bank, adapters, budget)


def bank_metrics(fitted, served, base_params: int) -> dict:
    """Size and errors of a fitted bank and of its served form (exact adapters included)."""
    from compression import bank_param_count, exact_param_count, mean_recon_errors

    fit_errors, errors = mean_recon_errors(fitted), mean_recon_errors(served)
    params = bank_param_count(served)
    return {"mean_error": sum(errors) / len(errors), "max_error": max(errors),
            "fit_mean_error": sum(fit_errors) / len(fit_errors), "fit_max_error": max(fit_errors),
            "bank_params": params, "param_ratio": params / base_params, "exact_adapters": len(served.exact),
            "exact_params": exact_param_count(served), "clusters_served": served.num_clusters}


def trial(config: dict, adapters: list, base_params: int, budget: float) -> None:
    """One Tune trial: fit (rank, clusters, method), store the over-budget adapters exactly, report size and error."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    fitted, served = fit_within_budget(adapters, config["rank"], config["clusters"], config["method"], budget,
                                       config.get("seed", 0))
    tune.report({**bank_metrics(fitted, served, base_params), "fit_s": time.perf_counter() - start})


def choose(results: list[dict]) -> SweepChoice | None:
    """The smallest bank (parameters stored, exact clusters included; ties: lower mean error)."""
    if not results:
        return None
    best = min(results, key=lambda r: (r["bank_params"], r["mean_error"]))
    return SweepChoice(best["rank"], best["clusters"], best["method"], best["mean_error"], best["bank_params"],
                       best["exact_adapters"])


def plot(results: list[dict], base_params: int, budget: float, path: Path) -> None:
    """Served bank size (% of the uncompressed collection, exact clusters included) vs the fit's mean error
    (before over-budget adapters were stored exactly); one line per (K, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (k, method) in sorted({(r["clusters"], r["method"]) for r in results}):
        pts = sorted((100 * r["bank_params"] / base_params, r["fit_mean_error"]) for r in results
                     if r["clusters"] == k and r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o" if method == "full" else "s",
                linestyle="-" if method == "full" else "--", label=f"K={k} {method}")
    ax.axhline(budget, color="grey", linewidth=0.8, linestyle=":", label=f"per-adapter budget {budget}")
    ax.set_xlabel("served bank size (% of the adapters' parameters, exact adapters included)")
    ax.set_ylabel("fit's mean squared relative recon. error")
    ax.set_xscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METRICS = ("mean_error", "max_error", "fit_mean_error", "fit_max_error", "bank_params", "param_ratio",
           "exact_adapters", "exact_params", "clusters_served", "fit_s")


def run_sweep(adapters: list, ranks: list[int], clusters: list[int], methods: list[str], storage: Path,
              max_concurrent: int = 2, seed: int = 0, budget: float | None = None,
              trial_cpus: float = 1.0) -> list[dict]:
    """Run the grid on Ray Tune; one row per trial with its config and metrics."""
    from compression import DEFAULT_ERROR_BUDGET, collection_param_count

    budget = DEFAULT_ERROR_BUDGET if budget is None else budget
    base_params = collection_param_count(adapters)
    clusters = sorted({min(k, len(adapters)) for k in clusters})
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, adapters=adapters, base_params=base_params, budget=budget),
                            {"cpu": trial_cpus}),
        param_space={"rank": tune.grid_search(ranks), "clusters": tune.grid_search(clusters),
                     "method": tune.grid_search(methods), "seed": seed},
        tune_config=tune.TuneConfig(metric="bank_params", mode="min", max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="bank_sweep", storage_path=str(storage.resolve())))
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"trial {result.config} failed: {result.error}")
        rows.append({k: result.config[k] for k in ("rank", "clusters", "method")} |
                    {k: result.metrics[k] for k in METRICS})
    return sorted(rows, key=lambda r: (r["method"], r["clusters"], r["rank"]))


def write_report(out: Path, rows: list[dict], adapters: int, base_params: int, budget: float,
                 choice: SweepChoice | None) -> dict:
    """sweep.json, sweep.md (one row per trial) and sweep.png; returns the report."""
    report = {"adapters": adapters, "collection_params": base_params, "budget": budget,
              "choice": choice.__dict__ if choice else None, "trials": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    plot(rows, base_params, budget, out / "sweep.png")
    lines = ["| method | K | r | fit mean err | served mean err | served max err | exact adapters | "
             "bank % of adapters | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['clusters']} | {r['rank']} | {r['fit_mean_error']:.3f} | {r['mean_error']:.3f} | "
              f"{r['max_error']:.3f} | {r['exact_adapters']} | {100 * r['param_ratio']:.2f} | {r['fit_s']:.1f} |"
              for r in rows]
    verdict = (f"Chosen: {choice.method} K={choice.clusters} r={choice.rank}: {choice.exact_adapters} of {adapters} "
               f"adapters exact, served mean error {choice.mean_error:.4f} (budget {budget} per adapter), "
               f"{100 * choice.bank_params / base_params:.2f} % of the parameters" if choice else "No trial ran.")
    (out / "sweep.md").write_text("\n".join([f"# Bank sweep ({adapters} adapters)", "", *lines, "", verdict]) + "\n")
    report["verdict"] = verdict
    return report


def publish_refit(registry: Registry, bank_name: str, bank, used: dict[str, str], model, budget: float,
                  metadata: dict, max_rank: int | None = None) -> tuple[int, list[str]]:
    """Publish a refitted bank without losing uploads made while it was fitted.

    Under the bank lock: every adapter of the latest bank that the refit did not see, or saw in an
    older upload (SHA-256 of its weights differs), is added to the refitted bank within ``budget``.
    Returns (version, names added back)."""
    with registry.lock(f"bank-{bank_name}"):
        latest, latest_version = read_bank(registry, bank_name)
        merged, since = [], 0
        for name in latest.adapters if latest is not None else []:
            tenant, artifact = name.split("/", 1)
            if name in used and adapter_sha256(registry, tenant, artifact) == used[name]:
                continue
            bank, placed = place_adapter(bank, load_registry_adapter(registry, tenant, artifact, model), budget,
                                         model, max_rank)
            merged.append(name)
            if placed.served == "exact":
                since += sum(d_out + d_in for d_out, d_in in (mb.shape for mb in bank.modules.values())) * \
                    bank.exact[name][1]
        version = publish_bank(registry, bank_name, bank, {
            **metadata, "based_on": latest_version, "merged_after_refit": merged, "error_budget": budget,
            "exact_params_since_refit": since})
    return version, merged


def refit_bank(store: str, bank_name: str, model_name: str, budget: float | None = None,
               ranks: tuple[int, ...] = (4, 8, 16, 32), clusters: tuple[int, ...] = (1, 2, 4, 8),
               methods: tuple[str, ...] = ("full", "diag", "lowrank"), out: str | None = None, max_concurrent: int = 1,
               trial_cpus: float = 1.0, max_rank: int | None = None, seed: int = 0) -> dict:
    """Refit ``system/bank/<bank_name>`` from the adapters it holds: sweep, refit the smallest bank within
    the budget, publish (merging concurrent uploads). What the service queues when a refit is due."""
    from compression import DEFAULT_ERROR_BUDGET, collection_param_count

    start = time.perf_counter()
    budget = DEFAULT_ERROR_BUDGET if budget is None else budget
    registry, model = Registry(store), resolve_model(model_name)
    out_dir = Path(out) if out else load_settings().home / "bank-sweeps" / f"{bank_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    adapters, used, version = load_bank_collection(registry, bank_name, model)
    if not adapters:
        return {"bank": bank_name, "published_version": None, "reason": "no bank"}
    ranks = [r for r in ranks if max_rank is None or r <= max_rank]
    log.info("refit.start", bank=bank_name, version=version, adapters=len(adapters), budget=budget)
    rows = run_sweep(adapters, ranks, list(clusters), list(methods), out_dir / "tune", max_concurrent, seed, budget,
                     trial_cpus)
    choice = choose(rows)
    report = write_report(out_dir, rows, len(adapters), collection_param_count(adapters), budget, choice)
    _, bank = fit_within_budget(adapters, choice.rank, choice.clusters, choice.method, budget, seed, model)
    published, merged = publish_refit(registry, bank_name, bank, used, model, budget, {
        "refit": {"from_version": version, "sweep": str(out_dir), **choice.__dict__}}, max_rank)
    report.update(bank=bank_name, from_version=version, published_version=published, merged_after_refit=merged,
                  seconds=round(time.perf_counter() - start, 1))
    log.info("refit.done", bank=bank_name, version=published, merged=len(merged), seconds=report["seconds"],
             choice=choice.__dict__)
    return report


def main(argv: list[str] | None = None) -> dict:
    from compression import DEFAULT_ERROR_BUDGET

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
    p.add_argument("--max-rank", type=int, default=None, help="largest bank rank (a vLLM pool's max_lora_rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="publish the chosen bank to the registry")
    p.add_argument("--bank", default="default", help="bank name (a pool's `bank`, default: the pool name)")
    p.add_argument("--store", default=None, help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--out", default=None, help="results directory (default: <home>/bank-sweeps/<time>)")
    args = p.parse_args(argv)

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
    from compression import collection_param_count

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


if __name__ == "__main__":
    main()
