"""Membership-inference audit of the tenant experts: what can an attacker who holds the published
weights learn about who was in the private training table?

For each dataset (titanic, bank), regime and privacy level (no DP, ε = 5, ε = 1), ``--shadows``
experts are trained, exactly as the experts job trains them (:func:`llamdex.dp_training.train_expert`,
its default secure RNG, δ = default_delta(n), PRV accountant), each on a random half of a data
pool (complementary pairs: every example is in exactly half of the models). Each model in turn is the attacked target
and the others are its shadow models (:func:`bench.mia.leave_one_out`), and two attacks score
every (target, example) pair:

* **threshold**: the loss / confidence threshold attack (one global threshold on the target's
  confidence in the true label; -loss and p_y rank identically);
* **LiRA** (online, global variance; Carlini et al. 2022): per-example Gaussians of the shadows'
  confidence with and without the example.

Reported: AUC and TPR at 1 % and 10 % FPR, with 95 % bootstrap intervals over examples, next to
the highest TPR that (ε, δ)-DP allows at that FPR, and the targets' accuracy on their held-out
half (the utility the privacy costs). Regimes:

* **paper**: the experts job's defaults (MLP 400-200, 10 epochs, batch 64, lr 1e-3); titanic
  pool = all 887 rows (443/444 per model), bank pool = 6,000 of its 45,211 rows (3,000 per model,
  for runtime: smaller training sets leak more, so this over- rather than under-states the
  leakage of the deployed 36k-row bank expert);
* **overfit**: a setting built to leak without DP (a few hundred rows, a wider MLP, many epochs),
  so that the audit demonstrably detects leakage when there is some.

Models are cached under ``--cache`` (per setting, by a fingerprint of everything that determines
them), so re-runs only re-score. Writes ``privacy_audit.json`` / ``.md`` / ``.png`` to ``--out``.

    python -m bench.privacy_audit                                  # everything (35 min on 1 core, measured)
    python -m bench.privacy_audit --datasets titanic --shadows 16  # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bench import mia
from bench.llamdex_accuracy import fingerprint, log

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("titanic", "bank")


@dataclasses.dataclass(frozen=True)
class Regime:
    """How the audited experts are trained, and on how much data."""

    pool: dict[str, int | None]  # rows in the data pool per dataset (None = the whole dataset)
    hidden: tuple[int, ...] = (400, 200)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    max_grad_norm: float = 1.0


REGIMES = {
    "paper": Regime(pool={"titanic": None, "bank": 6_000}),
    "overfit": Regime(pool={"titanic": 200, "bank": 200}, hidden=(256, 256), epochs=200, batch_size=32),
}


def load_pool(name: str, rows: int | None, seed: int):
    """(encoded features, labels) of the pool: the whole dataset or ``rows`` rows drawn at ``seed``."""
    import pandas as pd

    from llamdex.codec import FeatureCodec
    from llamdex.datasets import load_paper_dataset

    schema, train, test = load_paper_dataset(name, ROOT / "examples" / "datasets")
    data = pd.concat([train, test], ignore_index=True)
    if rows is not None and rows < len(data):
        data = data.iloc[np.sort(np.random.default_rng(seed).choice(len(data), rows, replace=False))]
    x = FeatureCodec(schema).encode(data[[f.name for f in schema.features]])
    return schema, x, data[schema.target.name].to_numpy(dtype=np.int64)


def membership(models: int, rows: int, seed: int) -> np.ndarray:
    """(models, rows) bool, in complementary pairs: models 2k and 2k+1 split the pool into two
    random halves. Every example is IN for exactly half of the models and every model trains on
    half of the pool (so one noise calibration serves a whole setting)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((models, rows), dtype=bool)
    for k in range(0, models, 2):
        half = rng.permutation(rows) < rows // 2
        out[k], out[k + 1] = half, ~half
    return out


def _memoize_noise_calibration() -> None:
    """Opacus calibrates sigma for (epsilon, delta, q, epochs) by a search over accountant runs,
    seconds per model with PRV; the result is a pure function of those numbers, so the audit
    computes it once per setting instead of once per model (same value, less CPU)."""
    import functools

    import opacus.privacy_engine as pe

    if not hasattr(pe.get_noise_multiplier, "cache_info"):
        pe.get_noise_multiplier = functools.lru_cache(maxsize=None)(pe.get_noise_multiplier)


def train_setting(name: str, regime: Regime, epsilon: float | None, shadows: int, seed: int, cache: Path) -> dict:
    """Train (or load) the ``shadows`` models of one setting; returns phi, membership, ledgers."""
    import torch

    from llamdex.dp_training import default_delta, train_expert
    from llamdex.expert import ExpertArch

    schema, x, y = load_pool(name, regime.pool[name], seed)
    key = fingerprint([name, dataclasses.asdict(regime), epsilon, shadows, seed, schema.sha256(), len(x)])
    path = cache / f"{name}-eps{epsilon or 'inf'}-{key}.npz"
    members = membership(shadows, len(x), seed + 1)
    if path.exists():
        saved = np.load(path, allow_pickle=False)
        done = json.loads(str(saved["meta"]))
        if done["models"] == shadows:
            return {"phi": saved["phi"], "members": members, **done}
    arch = ExpertArch.from_schema(schema, hidden_sizes=regime.hidden)
    _memoize_noise_calibration()
    phi, ledgers, accs, seconds = np.zeros((shadows, len(x))), [], [], []
    for m in range(shadows):
        start = time.process_time()
        idx = np.flatnonzero(members[m])
        model, ledger = train_expert(x[idx], y[idx], arch, epsilon, default_delta(len(idx)), regime.epochs,
                                     regime.batch_size, regime.lr, regime.max_grad_norm)  # secure RNG, as the job
        with torch.no_grad():
            logits = model.logits(torch.from_numpy(x)).numpy()
        phi[m] = mia.true_class_logit(logits, y)
        pred = (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(1)
        accs.append(float((pred[~members[m]] == y[~members[m]]).mean()))
        ledgers.append(ledger.model_dump())
        seconds.append(time.process_time() - start)
        log("audit.model", dataset=name, epsilon=epsilon, model=m + 1, of=shadows, rows=len(idx),
            epsilon_spent=ledger.epsilon, heldout_accuracy=round(accs[-1], 4), cpu_s=round(seconds[-1], 1))
    majority = float(max(np.mean(y), 1 - np.mean(y))) if y.max() <= 1 else float(np.bincount(y).max() / len(y))
    meta = {"models": shadows, "rows_per_model": int(members.sum(1).mean()), "pool_rows": len(x),
            "ledgers": ledgers, "heldout_accuracy": accs, "majority_accuracy": majority, "cpu_seconds": seconds}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, phi=phi, meta=json.dumps(meta))
    return {"phi": phi, "members": members, **meta}


def audit_setting(name: str, regime_name: str, epsilon: float | None, trained: dict, reps: int) -> list[dict]:
    """One result row per attack."""
    ledgers = trained["ledgers"]
    spent = max(led["epsilon"] for led in ledgers) if epsilon is not None else None
    delta = max(led["delta"] for led in ledgers) if epsilon is not None else None
    rows = []
    for attack in ("threshold", "lira"):
        scores, labels = mia.leave_one_out(trained["phi"], trained["members"], attack)
        rows.append({
            "dataset": name, "regime": regime_name, "epsilon_target": epsilon, "epsilon_spent": spent, "delta": delta,
            "attack": attack, "models": trained["models"], "rows_per_model": trained["rows_per_model"],
            "pool_rows": trained["pool_rows"], "heldout_accuracy": float(np.mean(trained["heldout_accuracy"])),
            "majority_accuracy": trained["majority_accuracy"], "cpu_seconds_training": float(sum(trained["cpu_seconds"])),
            "metrics": mia.bootstrap_metrics(scores, labels, reps),
            "dp_bound": {"auc": mia.dp_auc_bound(spent, delta),
                         **{f"tpr@{f:g}": mia.dp_tpr_bound(spent, delta, f) for f in mia.FPRS}},
            "roc": _thin_roc(*mia.roc(scores, labels)),
        })
    return rows


def _thin_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = 200) -> dict:
    """The ROC at log-spaced FPRs (for the plot; the full curve has one point per pair)."""
    grid = np.r_[0.0, np.logspace(-4, 0, points)]
    return {"fpr": grid.tolist(), "tpr": [float(tpr[fpr <= g].max()) for g in grid]}


def _ci(m: dict, pct: bool = False) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(m['value'])} [{f(m['lo'])}, {f(m['hi'])}]"


def table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        m, b = r["metrics"], r["dp_bound"]
        eps = "none" if r["epsilon_target"] is None else f"{r['epsilon_spent']:.2f} (δ {r['delta']:g})"
        out.append({"dataset": r["dataset"], "regime": r["regime"], "rows/model": r["rows_per_model"],
                    "ε spent": eps, "held-out acc %": f"{100 * r['heldout_accuracy']:.1f} "
                                                      f"(majority {100 * r['majority_accuracy']:.1f})",
                    "attack": r["attack"], "AUC [95% CI]": _ci(m["auc"]),
                    "TPR@1%FPR % [CI]": _ci(m["tpr@0.01"], pct=True), "TPR@10%FPR % [CI]": _ci(m["tpr@0.1"], pct=True),
                    "DP bound AUC / TPR@1% / TPR@10%": "—" if r["epsilon_target"] is None else
                    f"{b['auc']:.3f} / {100 * b['tpr@0.01']:.1f} / {100 * b['tpr@0.1']:.1f}"})
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """One line per setting and attack: is leakage detected (CI above chance), is it within the DP bound."""
    lines = []
    for r in rows:
        m, b = r["metrics"], r["dp_bound"]
        detected = m["auc"]["lo"] > 0.5 or m["tpr@0.01"]["lo"] > 0.01 or m["tpr@0.1"]["lo"] > 0.1
        eps = "no DP" if r["epsilon_target"] is None else f"ε = {r['epsilon_spent']:.2f}"
        line = (f"- {r['dataset']} / {r['regime']} / {eps} / {r['attack']}: "
                + ("leakage DETECTED (a CI lies above chance)" if detected else "no leakage detected (every CI "
                   "includes chance)"))
        if r["epsilon_target"] is not None:
            within = all(m[k]["value"] <= b[k] for k in ("auc", "tpr@0.01", "tpr@0.1"))
            line += "; within the DP bound" if within else "; ABOVE the DP bound (the guarantee would be broken)"
        lines.append(line)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dataset"], r["regime"]) for r in rows))  # in the table's order
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    colors = {None: "tab:red", 5.0: "tab:orange", 1.0: "tab:blue"}
    for ax, (name, regime) in zip(axes[0], panels, strict=True):
        for r in (r for r in rows if (r["dataset"], r["regime"]) == (name, regime)):
            eps = r["epsilon_target"]
            label = f"{'no DP' if eps is None else f'ε={eps:g}'} {r['attack']} (AUC {r['metrics']['auc']['value']:.2f})"
            ax.plot(r["roc"]["fpr"][1:], r["roc"]["tpr"][1:], color=colors.get(eps, "gray"),
                    ls="-" if r["attack"] == "lira" else "--", lw=1.3, label=label)
            if eps == 1.0 and r["attack"] == "lira":
                grid = np.logspace(-4, 0, 100)
                ax.plot(grid, [mia.dp_tpr_bound(r["epsilon_spent"], r["delta"], g) for g in grid], color="tab:blue",
                        ls=":", lw=1, label="DP bound at ε≈1")
        ax.plot([1e-4, 1], [1e-4, 1], color="black", lw=0.8, label="chance")
        ax.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1), xlabel="false positive rate",
               ylabel="true positive rate", title=f"{name}, {regime} regime")
        ax.legend(fontsize=6, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.privacy_audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
    p.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of " + ",".join(REGIMES))
    p.add_argument("--regime-overrides", default="{}",
                   help="JSON {regime: {field: value}} overrides, e.g. '{\"overfit\": {\"epochs\": 100}}' "
                        f"(fields: {', '.join(f.name for f in dataclasses.fields(Regime))})")
    p.add_argument("--epsilons", default="none,5,1", help="privacy levels: 'none' (no DP) and target ε values")
    p.add_argument("--shadows", type=int, default=32, help="models per setting (each is target once, shadow otherwise)")
    p.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="pool and membership design seed (training uses the secure RNG)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--cache", default="~/.cache/atelier/bench/privacy", help="trained-model scores cache")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default="privacy_audit", help="result file stem")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    from bench.common import command_line, write_results

    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.shadows < 8 or args.shadows % 2:
        raise SystemExit("--shadows: use an even number >= 8 (each example is IN for exactly half of the models; "
                         "LiRA needs a few IN and OUT shadows per example)")
    overrides = json.loads(args.regime_overrides)
    regimes = {n: dataclasses.replace(REGIMES[n], **{k: tuple(v) if k == "hidden" else v
                                                     for k, v in overrides.get(n, {}).items()})
               for n in args.regimes.split(",")}
    epsilons = [None if e.strip() == "none" else float(e) for e in args.epsilons.split(",")]
    cache, out = Path(args.cache).expanduser(), Path(args.out)
    rows, started = [], time.perf_counter()
    for regime_name, regime in regimes.items():
        for name in args.datasets.split(","):
            for eps in epsilons:
                trained = train_setting(name, regime, eps, args.shadows, args.seed, cache)
                rows += audit_setting(name, regime_name, eps, trained, args.bootstrap)
                log("audit.setting", dataset=name, regime=regime_name, epsilon=eps,
                    **{r["attack"]: round(r["metrics"]["auc"]["value"], 4) for r in rows[-2:]})
    wall = time.perf_counter() - started
    train_cpu = sum(r["cpu_seconds_training"] for r in rows if r["attack"] == "lira")
    notes = "\n".join([
        f"{args.shadows} models per setting, each the target once (the other {args.shadows - 1} are its shadows); "
        "members = its training half, non-members = the other half of the pool. Intervals: 95 % two-way bootstrap "
        f"over models and examples ({args.bootstrap} resamples). 'DP bound' = the highest AUC / TPR any attack can reach against an "
        "(ε, δ)-DP mechanism at that FPR (Kairouz et al. 2015), with the ε actually spent. Chance = AUC 0.5, TPR = FPR.",
        "", f"Training CPU time (all models, as cached): {train_cpu / 60:.1f} min; this run's wall time "
            f"{wall / 60:.1f} min (threads={args.threads}).", "", "Verdicts:", *verdicts(rows)])
    payload = {"args": vars(args), "regimes": {k: dataclasses.asdict(v) for k, v in regimes.items()},
               "results": rows, "wall_seconds": wall, "training_cpu_seconds": train_cpu}
    write_results(out, args.name, payload, table(rows), "Membership-inference audit of the tenant experts",
                  command_line("bench.privacy_audit", argv), notes)
    plot(rows, out / f"{args.name}.png")
    print((out / f"{args.name}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
