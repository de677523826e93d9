"""Scale for bench/compression.py: 1000 adapters, without telling the sweep the answer.

1. ``planted_grid``: STRUCTURED SYNTHETIC adapters (``compression.synthetic``, planted groups) with
   the real module shapes; the whole r × K grid is fitted and reported (not only the planted r, K).
2. ``family_collection``: adapters made from the TRAINED adapters of 2-3 task families, each a
   trained adapter of its family with its factors perturbed (relative noise). How many groups that
   makes is not given to anything; ``train_jobs.bank_sweep.run_sweep`` (Ray Tune, the same sweep a
   refit runs) picks r, K and Full/Diag for the smallest bank that serves every adapter within the
   error budget, and the bench reports which K it found and how its clusters line up with families.
3. ``scaling``: bank size, error and fit time vs the number of adapters (10 → 1000) of that
   collection, for the configuration the sweep chose.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import torch


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
    from compression.synthetic import synthetic_collection

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
    from compression import collection_param_count
    from train_jobs.bank_sweep import choose, fit_within_budget, run_sweep

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
