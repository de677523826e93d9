"""Ray Tune sweep that picks the adapter bank: rank r × clusters K × JD-Full/JD-Diag.

Every trial compresses the whole adapter collection with one (r, K, method) and reports the
mean / max squared relative reconstruction error and the bank's parameter count. The chosen
bank is the *smallest* one whose mean error stays under ``--budget`` (ties: lower error); it is
refitted once and published to the registry as ``system/bank/<--bank>``, so running replicas
pick it up within seconds. Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` (bank size vs
error, one line per K and method) to ``--out``.

    ray job submit -- python -m train_jobs.bank_sweep --adapters ~/.cache/atelier/lora-adapters/smollm2-135m \
        --model smollm2-135m --ranks 4,8,16,32 --clusters 1,2,4,8 --methods full,diag --publish
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune

from cluster.banks import model_linear_shapes, publish_bank
from cluster.logs import get_logger
from cluster.models import resolve_model
from cluster.registry import Registry
from cluster.settings import load_settings

log = get_logger("bank_sweep")
DEFAULT_BUDGET = 0.08
"""Max mean squared relative reconstruction error of the chosen bank. Measured by bench/compression.py on the
100 trained SmolLM2-135M codebook adapters (docs/bench/compression.md): every JD bank with mean error <= 0.084
kept >= 95 % of the originals' exact-match accuracy (trained phrasings); the lowest-error miss had 0.093
(92 %). Held-out paraphrases need <= ~0.03 for 95 %. The paper's "50 % error preserves performance" does not
hold for these fact-memorising adapters: banks near 0.5 kept 30-50 % of the accuracy."""


@dataclass(frozen=True)
class SweepChoice:
    rank: int
    clusters: int
    method: str
    mean_error: float
    bank_params: int


def load_collection(adapters_dir: Path | None, registry: Registry | None, model) -> list:
    """Adapters to compress: PEFT dirs under ``adapters_dir`` or every tenant adapter in the registry."""
    from cluster.banks import load_registry_adapter
    from compression import load_peft_adapter

    shapes = model_linear_shapes(str(model.path))
    if adapters_dir is not None:
        found = []
        for d in sorted(p for p in adapters_dir.iterdir() if (p / "adapter_config.json").exists()):
            meta = json.loads((d / "task.json").read_text()) if (d / "task.json").exists() else {}
            tenant = meta.get("tenant") or meta.get("task", {}).get("tenant") or "local"
            name = meta.get("model_id") or f"{tenant}/{d.name}"  # served as model="<tenant>/<adapter>"
            found.append(load_peft_adapter(d, name=name, base_shapes=shapes))
        return found
    return [load_registry_adapter(registry, t.id, m.name, model)
            for t in registry.list_tenants() for m in registry.list_artifacts(t.id, "adapter")]


def trial(config: dict, adapters: list, base_params: int) -> None:
    """One Tune trial: compress with (rank, clusters, method) and report error and size."""
    import torch

    from compression import bank_param_count, compress_collection, mean_recon_errors

    torch.set_num_threads(1)
    start = time.perf_counter()
    bank = compress_collection(adapters, rank=config["rank"], clusters=config["clusters"], method=config["method"],
                               seed=config.get("seed", 0))
    errors = mean_recon_errors(bank)
    params = bank_param_count(bank)
    tune.report({"mean_error": sum(errors) / len(errors), "max_error": max(errors), "bank_params": params,
                 "param_ratio": params / base_params, "fit_s": time.perf_counter() - start})


def choose(results: list[dict], budget: float) -> SweepChoice | None:
    """The smallest bank (by parameters) with mean error ≤ budget; None if no trial meets it."""
    ok = [r for r in results if r["mean_error"] <= budget]
    if not ok:
        return None
    best = min(ok, key=lambda r: (r["bank_params"], r["mean_error"]))
    return SweepChoice(best["rank"], best["clusters"], best["method"], best["mean_error"], best["bank_params"])


def plot(results: list[dict], base_params: int, budget: float, path: Path) -> None:
    """Bank size (% of the uncompressed collection) vs mean error; one line per (K, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (k, method) in sorted({(r["clusters"], r["method"]) for r in results}):
        pts = sorted((100 * r["bank_params"] / base_params, r["mean_error"]) for r in results
                     if r["clusters"] == k and r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o" if method == "full" else "s",
                linestyle="-" if method == "full" else "--", label=f"K={k} {method}")
    ax.axhline(budget, color="grey", linewidth=0.8, linestyle=":", label=f"budget {budget}")
    ax.set_xlabel("bank size (% of the adapters' parameters)")
    ax.set_ylabel("mean squared relative recon. error")
    ax.set_xscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(adapters: list, ranks: list[int], clusters: list[int], methods: list[str], storage: Path,
              max_concurrent: int = 2, seed: int = 0) -> list[dict]:
    """Run the grid on Ray Tune; one row per trial with its config and metrics."""
    from compression import collection_param_count

    base_params = collection_param_count(adapters)
    clusters = [k for k in clusters if k <= len(adapters)]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, adapters=adapters, base_params=base_params), {"cpu": 1}),
        param_space={"rank": tune.grid_search(ranks), "clusters": tune.grid_search(clusters),
                     "method": tune.grid_search(methods), "seed": seed},
        tune_config=tune.TuneConfig(metric="mean_error", mode="min", max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="bank_sweep", storage_path=str(storage.resolve())))
    grid = tuner.fit()
    rows = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"trial {result.config} failed: {result.error}")
        rows.append({k: result.config[k] for k in ("rank", "clusters", "method")} |
                    {k: result.metrics[k] for k in ("mean_error", "max_error", "bank_params", "param_ratio", "fit_s")})
    return sorted(rows, key=lambda r: (r["method"], r["clusters"], r["rank"]))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapters", help="directory of PEFT adapter directories (e.g. the LoRA job's output)")
    src.add_argument("--from-registry", action="store_true", help="every tenant adapter in the registry")
    p.add_argument("--model", default=None, help="base model (default: ATELIER_DEFAULT_MODEL)")
    p.add_argument("--ranks", default="4,8,16,32", help="comma-separated ranks r")
    p.add_argument("--clusters", default="1,2,4,8", help="comma-separated cluster counts K")
    p.add_argument("--methods", default="full,diag", help="full, diag or both")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"max mean squared relative reconstruction error of the chosen bank (default {DEFAULT_BUDGET}: "
                   "the error up to which banks of the trained SmolLM2 adapters kept >= 95 %% of their accuracy, "
                   "docs/bench/compression.md)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials in parallel (1 CPU each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--publish", action="store_true", help="publish the chosen bank to the registry")
    p.add_argument("--bank", default="default", help="bank name (a pool's `bank`, default: the pool name)")
    p.add_argument("--store", default=None, help="registry URI (default: ATELIER_STORE)")
    p.add_argument("--out", default=None, help="results directory (default: <home>/bank-sweeps/<time>)")
    args = p.parse_args(argv)

    settings = load_settings()
    registry = Registry(args.store or settings.store_uri)
    model = resolve_model(args.model, settings)
    out = Path(args.out) if args.out else settings.home / "bank-sweeps" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    ray.init(ignore_reinit_error=True)
    adapters = load_collection(Path(args.adapters).expanduser() if args.adapters else None, registry, model)
    if not adapters:
        raise SystemExit("no adapters found; fix: point --adapters at PEFT directories or publish some")
    log.info("sweep.start", adapters=len(adapters), ranks=args.ranks, clusters=args.clusters, methods=args.methods)
    rows = run_sweep(adapters, [int(x) for x in args.ranks.split(",")], [int(x) for x in args.clusters.split(",")],
                     args.methods.split(","), out / "tune", args.max_concurrent, args.seed)
    from compression import collection_param_count, compress_collection

    base_params = collection_param_count(adapters)
    choice = choose(rows, args.budget)
    report = {"adapters": len(adapters), "collection_params": base_params, "budget": args.budget,
              "choice": choice.__dict__ if choice else None, "trials": rows}
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    plot(rows, base_params, args.budget, out / "sweep.png")
    lines = ["| method | K | r | mean err | max err | bank % of adapters | fit s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['clusters']} | {r['rank']} | {r['mean_error']:.3f} | {r['max_error']:.3f} | "
              f"{100 * r['param_ratio']:.2f} | {r['fit_s']:.1f} |" for r in rows]
    verdict = (f"Chosen: {choice.method} K={choice.clusters} r={choice.rank} (mean error {choice.mean_error:.3f}, "
               f"{100 * choice.bank_params / base_params:.2f} % of the parameters)" if choice else
               f"No configuration met the budget {args.budget}; nothing published.")
    (out / "sweep.md").write_text("\n".join([f"# Bank sweep ({len(adapters)} adapters)", "", *lines, "", verdict]) + "\n")
    print(verdict)
    if choice and args.publish:
        bank = compress_collection(adapters, rank=choice.rank, clusters=choice.clusters, method=choice.method,
                                   seed=args.seed, base_model=model.id, base_model_hash=model.content_hash)
        version = publish_bank(registry, args.bank, bank, {"sweep": str(out), "budget": args.budget})
        report["published_version"] = version
        print(f"published system/bank/{args.bank}@{version}")
    return report


if __name__ == "__main__":
    main()
