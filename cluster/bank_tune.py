"""The Ray Tune sweep over bank configurations: rank r × clusters K × JD-Full/JD-Diag/lowrank.

Every trial compresses the whole adapter collection with one (r, K, method) and stores exactly every
adapter whose reconstruction error exceeds the budget (``compression.selection.fit_within_budget``),
so every trial's bank serves every adapter within the budget and the trials differ in what that
costs. :func:`run_sweep` returns one row per trial; :func:`write_report` writes ``sweep.json``,
``sweep.md`` and ``sweep.png``. Shared by the bank job (``train_jobs.bank_sweep``), the refit queue
(``cluster.bank_refit``) and the benchmarks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune

from compression import DEFAULT_ERROR_BUDGET, collection_param_count
from compression.selection import SweepChoice, bank_metrics, fit_within_budget


def trial(config: dict, adapters: list, base_params: int, budget: float) -> None:
    """One Tune trial: fit (rank, clusters, method), store the over-budget adapters exactly, report size and error."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    fitted, served = fit_within_budget(adapters, config["rank"], config["clusters"], config["method"], budget,
                                       config.get("seed", 0))
    tune.report({**bank_metrics(fitted, served, base_params), "fit_s": time.perf_counter() - start})


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

