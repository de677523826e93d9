"""Scale of the adapter bank to 1000 adapters, without telling the sweep the answer.

1. ``planted_grid``: STRUCTURED SYNTHETIC adapters (``compression.synthetic_adapters``, planted groups) with
   the real module shapes; the whole r × K grid is fitted and reported (not only the planted r, K).
2. ``family_collection``: adapters made from the TRAINED adapters of 2-3 task families, each a
   trained adapter of its family with its factors perturbed (relative noise). How many groups that
   makes is not given to anything; ``cluster.bank_tune.run_sweep`` (Ray Tune, the same sweep a
   refit runs) picks r, K and Full/Diag for the smallest bank that serves every adapter within the
   error budget, and the bench reports which K it found, how its clusters line up with families,
   and how long the sweep took (the refit time at that many adapters).
3. ``scaling``: bank size, error and fit time vs the number of adapters (10 → 1000) of that
   collection, for the configuration the sweep chose.

    python -m bench.compression_scale          # writes docs/bench/compression_scale.* (starts Ray: the sweep)
    python -m bench.compression_scale --quick --model tiny-random --adapters DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from cluster.logs import get_logger

ROOT = Path(__file__).resolve().parent.parent
log = get_logger("bench.compression_scale")
DEFAULTS = {"synthetic_n": 1000, "family_n": 1000, "scaling_sizes": "10,30,100,300,1000",
            "synthetic_grid": "full:8:1,full:8:2,full:8:4,full:8:8,full:8:16,full:16:1,full:16:2,full:16:4,full:16:8,"
                              "full:16:16,full:32:1,full:32:2,full:32:4,full:32:8,full:32:16,diag:32:8,diag:64:8",
            "family_grid": "4,8,16,32:1,2,4,8:full,diag,lowrank"}
QUICK = {"synthetic_n": 40, "family_n": 30, "scaling_sizes": "10,30", "synthetic_grid": "full:4:2,diag:4:2",
         "family_grid": "2,4:1,2:full"}


def _fit_row(adapters: list, method: str, rank: int, clusters: int, seed: int, budget: float, base: int) -> dict:
    from compression import bank_param_count, compress_collection, mean_recon_errors, serve_within_budget

    load0 = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    bank = compress_collection(adapters, rank, min(clusters, len(adapters)), method, seed)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    errors = mean_recon_errors(bank)
    served = serve_within_budget(bank, adapters, budget)
    return {"config": f"{method} r={rank} K={clusters}", "method": method, "rank": rank, "clusters": clusters,
            "adapters": len(adapters), "bank_pct": round(100 * bank_param_count(bank) / base, 2),
            "mean_error": round(sum(errors) / len(errors), 4), "max_error": round(max(errors), 4),
            "served_exact": len(served.exact), "served_pct": round(100 * bank_param_count(served) / base, 2),
            "fit_wall_s": round(wall, 1), "fit_cpu_s": round(cpu, 1),
            "load_1min": f"{load0:.1f}-{os.getloadavg()[0]:.1f}", "_bank": bank}


def planted_grid(shapes: dict, n: int, groups: int, latent_rank: int, r0: int, noise: float, grid: list[tuple],
                 budget: float, seed: int, log) -> list[dict]:
    """Fit every (method, r, K) of ``grid`` on n synthetic adapters with ``groups`` planted groups."""
    from compression import collection_param_count
    from compression.synthetic_adapters import synthetic_collection

    coll = synthetic_collection(n, shapes, clusters=groups, r0=r0, latent_rank=latent_rank, noise=noise, seed=seed)
    base = collection_param_count(coll.adapters)
    rows = []
    for method, rank, clusters in grid:
        row = _fit_row(coll.adapters, method, rank, clusters, seed, budget, base)
        bank = row.pop("_bank")
        row["cluster_label_pairs"] = len(set(zip(bank.clusters, coll.labels, strict=True)))
        rows.append(row)
        log.info("bench.planted", **row)
    return rows


def family_collection(trained: list, families: list[str], n: int, noise: float, seed: int) -> tuple[list, list[str]]:
    """n adapters: each a random trained adapter of one of ``families`` (``trained``: (adapter, family)
    pairs) with every factor perturbed by Gaussian noise of relative Frobenius norm ``noise``."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    pool = [(a, f) for a, f in trained if f in families]
    out, labels = [], []
    for i in range(n):
        adapter, family = pool[int(torch.randint(len(pool), (1,), generator=g))]
        factors = {}
        for m, (B, A) in adapter.factors.items():
            nb, na = torch.randn(B.shape, generator=g), torch.randn(A.shape, generator=g)
            factors[m] = (B + noise * B.norm() / nb.norm() * nb, A + noise * A.norm() / na.norm() * na)
        out.append(replace(adapter, name=f"perturbed-{i:04d}", factors=factors))
        labels.append(family)
    return out, labels


def sweep_families(adapters: list, labels: list[str], ranks: list[int], clusters: list[int], methods: list[str],
                   budget: float, storage, seed: int, max_concurrent: int) -> dict:
    """The Tune sweep on the family collection: its choice, the whole grid, and clusters vs families."""
    from cluster.bank_tune import run_sweep
    from compression import collection_param_count
    from compression.selection import choose, fit_within_budget

    t = time.perf_counter()
    rows = run_sweep(adapters, ranks, clusters, methods, storage, max_concurrent, seed, budget, trial_cpus=1.0)
    sweep_s = time.perf_counter() - t
    choice = choose(rows)
    t = time.perf_counter()
    fitted, served = fit_within_budget(adapters, choice.rank, choice.clusters, choice.method, budget, seed)
    refit_s = time.perf_counter() - t
    pairs = Counter(zip(fitted.clusters, labels, strict=True))
    base = collection_param_count(adapters)
    return {"adapters": len(adapters), "families": sorted(set(labels)), "choice": choice.__dict__,
            "chosen_pct": round(100 * choice.bank_params / base, 2), "sweep_wall_s": round(sweep_s, 1),
            "final_fit_wall_s": round(refit_s, 1), "trials": [
                {**r, "bank_pct": round(100 * r["param_ratio"], 2)} for r in rows],
            "clusters_vs_families": [{"cluster": c, "family": f, "adapters": k} for (c, f), k in sorted(pairs.items())],
            "exact_after_budget": len(served.exact)}


def scaling(adapters: list, sizes: list[int], method: str, rank: int, clusters: int, budget: float, seed: int,
            log) -> list[dict]:
    """Fit one configuration on the first n adapters for each n: size, error, time."""
    from compression import collection_param_count

    rows = []
    for n in sizes:
        subset = adapters[:n]
        row = _fit_row(subset, method, rank, clusters, seed, budget, collection_param_count(subset))
        row.pop("_bank")
        rows.append(row)
        log.info("bench.scaling", **row)
    return rows


def plot_scaling(rows: list[dict], path) -> None:
    """Bank size, error and fit time vs number of adapters (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["adapters"] for r in rows]
    for ax, keys, ylabel in (
            (axes[0], (("bank_pct", "fitted bank"), ("served_pct", "served (exact over budget)")),
             "stored parameters (% of the adapters)"),
            (axes[1], (("mean_error", "mean"), ("max_error", "max")), "squared relative recon. error"),
            (axes[2], (("fit_wall_s", "fit wall"),), "fit time (s, 1 core)")):
        for key, label in keys:
            ax.plot(n, [r[key] for r in rows], "-o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("adapters")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0]['config']} on perturbed trained adapters", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compression_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model of the trained adapters")
    p.add_argument("--adapters", default=None, help="the LoRA job's adapters (default ~/.cache/atelier/lora-adapters/<model>)")
    p.add_argument("--budget", type=float, default=None, help="per-adapter error budget (default "
                   "compression.DEFAULT_ERROR_BUDGET)")
    p.add_argument("--synthetic-n", type=int, default=None, help="synthetic adapters for the planted grid (0 = skip)")
    p.add_argument("--synthetic-grid", default=None, help="method:r:K,... fitted on the synthetic collection")
    p.add_argument("--synthetic-clusters", type=int, default=8, help="planted groups in the synthetic collection")
    p.add_argument("--synthetic-latent-rank", type=int, default=16, help="dimension of each group's subspaces")
    p.add_argument("--synthetic-noise", type=float, default=0.3, help="per-factor noise (relative Frobenius norm)")
    p.add_argument("--family-n", type=int, default=None, help="perturbed trained adapters for the sweep (0 = skip)")
    p.add_argument("--families", default="crate-colors,project-status,ticket-routing",
                   help="task families the perturbed collection is made from")
    p.add_argument("--family-noise", type=float, default=0.2, help="relative noise on each perturbed factor")
    p.add_argument("--family-grid", default=None, help="ranks:clusters:methods of the sweep on that collection "
                   f"(default {DEFAULTS['family_grid']}: the refit's default grid)")
    p.add_argument("--scaling-sizes", default=None, help="collection sizes for the scaling plot")
    p.add_argument("--max-concurrent", type=int, default=1, help="Tune trials in parallel (1 CPU each)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run (small collections, temp dir unless --out)")
    p.add_argument("--out", default=None, help="results directory (default docs/bench)")
    return p


def main(argv: list[str] | None = None) -> dict:
    from bench.common import command_line, write_results
    from bench.compression_report import markdown_table, parse_bench_args

    args, out = parse_bench_args(build_parser(), argv, DEFAULTS, QUICK, "bench-scale-", ROOT)
    torch.set_num_threads(args.threads)
    from cluster.banks import model_linear_shapes
    from cluster.models import resolve_model
    from cluster.settings import load_settings
    from compression import DEFAULT_ERROR_BUDGET, load_peft_adapter
    from compression.codebook.store import default_out_dir

    t_run, load_start = time.perf_counter(), os.getloadavg()
    budget = DEFAULT_ERROR_BUDGET if args.budget is None else args.budget
    model = resolve_model(args.model)
    shapes = model_linear_shapes(str(model.path))
    adapters_dir = Path(args.adapters).expanduser() if args.adapters else default_out_dir(model.id, load_settings().home)
    trained = []
    for d in sorted(d for d in adapters_dir.iterdir() if (d / "task.json").exists()):
        task = json.loads((d / "task.json").read_text())["task"]
        trained.append((load_peft_adapter(d, name=d.name, base_shapes=shapes), task["family"]))
    if not trained:
        raise SystemExit(f"no adapters in {adapters_dir}; fix: run python -m train_jobs.lora_adapters first")
    lora_rank = max(r for a, _ in trained for r in a.ranks.values())
    sweep = scaling_rows = None
    if args.family_n:
        import ray

        ranks, ks, methods = (x.split(",") for x in args.family_grid.split(":"))
        families = args.families.split(",")
        collection, labels = family_collection(trained, families, args.family_n, args.family_noise, args.seed)
        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=max(1, args.max_concurrent), include_dashboard=False, log_to_driver=False,
                     object_store_memory=int(1.5e9) if args.family_n >= 500 else None)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                sweep = sweep_families(collection, labels, [int(r) for r in ranks], [int(k) for k in ks], methods,
                                       budget, Path(tmp), args.seed, args.max_concurrent)
        finally:
            if started:
                ray.shutdown()
        c = sweep["choice"]
        sizes = [n for n in (int(x) for x in args.scaling_sizes.split(",")) if n <= len(collection)]
        scaling_rows = scaling(collection, sizes, c["method"], c["rank"], c["clusters"], budget, args.seed, log)
        plot_scaling(scaling_rows, out / "compression_scaling.png")
    grid = [(m, int(r), int(k)) for m, r, k in (x.split(":") for x in args.synthetic_grid.split(","))]
    synthetic = planted_grid(dict(trained[0][0].shapes), args.synthetic_n, args.synthetic_clusters,
                             args.synthetic_latent_rank, lora_rank, args.synthetic_noise, grid, budget, args.seed,
                             log) if args.synthetic_n else []
    wall = time.perf_counter() - t_run
    payload = {"args": vars(args), "budget": budget, "trained_adapters": len(trained), "family_sweep": sweep,
               "scaling": scaling_rows, "synthetic": synthetic,
               "run": {"wall_s": round(wall, 1), "load_start": load_start, "load_end": os.getloadavg()}}
    parts = []
    if sweep:
        c = sweep["choice"]
        parts.append(
            f"**Without the planted answer**: {sweep['adapters']} perturbed TRAINED adapters of the families "
            f"{', '.join(sweep['families'])} (each a trained adapter of its family, every factor + {args.family_noise} "
            f"relative Gaussian noise; the sweep is not told how many groups there are). The Ray Tune sweep "
            f"(`cluster.bank_tune.run_sweep`, the refit's own code, budget {budget} per adapter) chose "
            f"**{c['method']} r={c['rank']} K={c['clusters']}**: {sweep['chosen_pct']} % of the parameters, "
            f"{c['exact_adapters']} adapters exact, served mean error {c['mean_error']:.4f}. Sweep "
            f"{sweep['sweep_wall_s']} s + final fit {sweep['final_fit_wall_s']} s wall, {args.max_concurrent} trial(s) "
            f"at a time = the refit time at {sweep['adapters']} adapters. Its clusters vs the families:\n\n"
            + markdown_table(sweep["clusters_vs_families"], ["cluster", "family", "adapters"])
            + "\n\nEvery trial (`fit_mean_error`: the fit; `mean_error`/`max_error`: as served, over-budget adapters "
            "exact; `bank_pct` includes their exact clusters):\n\n" + markdown_table(sweep["trials"], [
                "method", "clusters", "rank", "fit_mean_error", "mean_error", "max_error", "exact_adapters",
                "bank_pct", "fit_s"]))
    if scaling_rows:
        parts.append("Size, error and fit time vs number of adapters (`compression_scaling.png`), the sweep's "
                     "configuration on the first n adapters of that collection:\n\n" + markdown_table(scaling_rows, [
                         "config", "adapters", "bank_pct", "served_pct", "served_exact", "mean_error", "max_error",
                         "fit_wall_s", "fit_cpu_s", "load_1min"]))
    parts.append(f"Torch threads {args.threads}, one core; 2-core box shared with other jobs (1-min load average "
                 f"before-after each fit). Whole run {wall / 60:.1f} min, load {load_start[0]:.1f} at start, "
                 f"{os.getloadavg()[0]:.1f} at end.")
    table = [{k: r[k] for k in ("config", "adapters", "bank_pct", "mean_error", "max_error", "served_exact",
                                "served_pct", "fit_wall_s", "fit_cpu_s", "load_1min", "cluster_label_pairs")}
             for r in synthetic]
    title = (f"Bank scale: {args.synthetic_n} STRUCTURED SYNTHETIC adapters ({args.synthetic_clusters} planted groups, "
             f"latent rank {args.synthetic_latent_rank}, noise {args.synthetic_noise}, the real module shapes; errors "
             "only, not trained), the whole r x K grid (`served_*`: at the budget)")
    write_results(out, "compression_scale", payload, table, title, command_line("bench.compression_scale", argv),
                  "\n\n".join(parts))
    print((out / "compression_scale.md").read_text())
    return payload


if __name__ == "__main__":
    main()
