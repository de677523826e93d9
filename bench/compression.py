"""LoRA-collection compression on trained adapters: task accuracy kept vs parameters stored, and scale.

One run, three parts:

1. Trained adapters (the LoRA job's output, ``train_jobs.lora_adapters``). Every bank of a grid
   (JD-Full / JD-Diag × rank r × clusters K, plus the per-adapter SVD baseline at rank 1, 2, ...)
   is fitted on the whole collection; its adapters' exact-match accuracy (trained phrasings and
   held-out paraphrases) is measured the way serving runs them: ``compression.attach_bank`` on the
   base model, one adapter per forward. Baseline, same run, same op: the ORIGINAL adapters as an
   exact bank (per-adapter SVD at their LoRA rank, reconstruction error 0). A few adapters are
   also exported as PEFT directories and evaluated through ``peft`` (answers and logits compared).
2. Error vs accuracy: the largest mean reconstruction error at which every measured bank still
   keeps the target share of accuracy; ``train_jobs.bank_sweep.DEFAULT_BUDGET`` comes from it.
3. Scale: STRUCTURED SYNTHETIC adapters (``compression.synthetic``, planted clusters) with the
   real collection's module shapes, n = 1000: parameter reduction, error, fit wall + CPU time.

    python -m bench.compression                                  # full run, writes docs/bench/compression.*
    python -m bench.compression --quick --model tiny-random --adapters DIR   # smoke run (temp dir)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.logs import get_logger

ROOT = Path(__file__).resolve().parent.parent
log = get_logger("bench.compression")
PAPER = ("Compress then Serve (arXiv 2407.00066, v4 / ICML 2025) claims: up to 1000 LoRAs served jointly; "
         "over 95 % compression with 500 and with 1000 LoRAs (slides); \"up to 50 % reconstruction error "
         "preserves the performance\" (slides; squared relative Frobenius error in the official code). "
         "Their setting: Mistral-7B, r=16 q/k/v LoRAs on Natural-Instructions tasks.")
DEFAULTS = {"limit": 0, "peft_checks": 3, "synthetic_n": 1000,
            # bank % of 100 SmolLM2 adapters (r=8, q/v/o of 6 layers) from 0.7 % to 19 %, a few larger banks
            # (28-33 %) where held-out accuracy recovers, Full vs Diag at equal per-adapter size (full r=4 ~
            # diag r=16, full r=8 ~ diag r=64), the per-adapter SVD baseline at 12.5 % and 25 %
            "grid": "full:4:1,full:8:1,full:16:1,full:32:1,full:8:2,full:16:2,full:24:2,full:4:4,full:8:4,"
                    "full:12:4,full:16:4,full:24:4,full:32:4,full:8:8,full:12:8,full:16:8,full:24:8,full:8:16,"
                    "diag:16:1,diag:64:1,diag:128:1,diag:32:2,diag:64:2,diag:16:4,diag:32:4,diag:64:4,svd:1,svd:2",
            "synthetic_grid": "full:16:4,full:16:8,full:8:8,diag:32:8,diag:16:16"}
QUICK = {"limit": 8, "peft_checks": 1, "synthetic_n": 40, "grid": "full:2:1,full:4:1,full:2:2,diag:4:1,svd:1",
         "synthetic_grid": "full:4:2,diag:4:2"}


@dataclass(frozen=True)
class Spec:
    """One bank configuration: method full | diag | svd (per-adapter baseline) | original (exact)."""

    method: str
    rank: int
    clusters: int = 1

    @property
    def label(self) -> str:
        if self.method in ("svd", "original"):
            return f"{self.method} r={self.rank}"
        return f"{self.method} r={self.rank} K={self.clusters}"


def parse_grid(text: str, n: int) -> list[Spec]:
    """'method:r:K,...' (svd: 'svd:r') -> specs; K > n is dropped."""
    specs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        if parts[0] not in ("full", "diag", "svd") or len(parts) != (2 if parts[0] == "svd" else 3):
            raise SystemExit(f"--grid item {item!r}: expected full:r:K, diag:r:K or svd:r")
        specs.append(Spec(parts[0], int(parts[1]), n if parts[0] == "svd" else int(parts[2])))
    return [s for s in specs if s.clusters <= n]


def build_bank(spec: Spec, adapters: list, model, seed: int, progress=None):
    """(bank, fit wall s, fit CPU s) for one spec; every bank is pinned to the base model."""
    from compression import compress_collection, svd_bank

    pin = {"base_model": model.id, "base_model_hash": model.content_hash}
    t, c = time.perf_counter(), time.process_time()
    if spec.method in ("svd", "original"):
        bank = svd_bank(adapters, spec.rank, **pin)
    else:
        bank = compress_collection(adapters, spec.rank, spec.clusters, spec.method, seed, progress=progress, **pin)
    return bank, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def evaluate_bank(model, tok, bank, tasks: list) -> list[dict]:
    """Per task (adapter i = task i): evaluate_detailed metrics and the greedy answers [N, 2], bank attached."""
    from compression import attach_bank
    from train_jobs.lora_tasks import eval_logits, score_logits

    handle = attach_bank(model, bank)
    rows = []
    try:
        for i, task in enumerate(tasks):
            with handle.using_one(i):
                logits = eval_logits(model, tok, task)
            rows.append({**score_logits(logits, tok, task), "answers": logits.argmax(-1)})
    finally:
        handle.detach()
    return rows


def accuracy_summary(rows: list[dict], original: list[dict]) -> dict:
    """Means over adapters, their ratio to the originals' means, and answer agreement with the originals."""
    def mean(key, rs):
        return sum(r[key] for r in rs) / len(rs)

    out = {}
    for key in ("accuracy", "heldout_accuracy"):
        out[key] = round(mean(key, rows), 4)
        out[f"{key}_retained"] = round(mean(key, rows) / max(mean(key, original), 1e-9), 4)
    same = [float((r["answers"] == o["answers"]).all(-1).float().mean()) for r, o in zip(rows, original, strict=True)]
    out["answer_agreement"] = round(sum(same) / len(same), 4)
    out["min_adapter_accuracy"] = min(r["accuracy"] for r in rows)
    return out


def peft_check(model, tok, bank, index: int, task, peft_dir: Path) -> dict:
    """Bank path vs a PEFT directory loaded by peft, for one adapter: same answers? max |Δ logit|?"""
    from peft import PeftModel

    from compression import attach_bank
    from train_jobs.lora_tasks import eval_logits

    handle = attach_bank(model, bank)
    try:
        with handle.using_one(index):
            bank_logits = eval_logits(model, tok, task)
    finally:
        handle.detach()
    peft_model = PeftModel.from_pretrained(model, str(peft_dir))
    try:
        peft_logits = eval_logits(peft_model, tok, task)
    finally:
        peft_model.unload()
    same = (bank_logits.argmax(-1) == peft_logits.argmax(-1)).all(-1).float().mean()
    return {"adapter": bank.adapters[index], "answers_equal": round(float(same), 4),
            "max_abs_logit_diff": float((bank_logits - peft_logits).abs().max()),
            "logit_scale": float(peft_logits.abs().max())}


def suggest_budget(rows: list[dict], target: float, keys: tuple[str, ...] = ("accuracy_retained",)
                   ) -> tuple[float | None, dict | None]:
    """(e, first failure): e is the largest mean error such that every evaluated bank with mean error <= e
    keeps >= target of the originals' accuracy on every metric in `keys` (None: the lowest-error bank
    already misses it); the first failure is the lowest-error bank that misses it (None: none does)."""
    ok_until = None
    for r in sorted((r for r in rows if all(k in r for k in keys)), key=lambda r: r["mean_error"]):
        if min(r[k] for k in keys) < target:
            return ok_until, r
        ok_until = r["mean_error"]
    return ok_until, None


def synthetic_scale(shapes: dict, args) -> list[dict]:
    """Fit the synthetic-grid banks on n structured synthetic adapters with the real module shapes."""
    from compression import bank_param_count, collection_param_count, compress_collection, mean_recon_errors
    from compression.synthetic import synthetic_collection

    coll = synthetic_collection(args.synthetic_n, shapes, clusters=args.synthetic_clusters, r0=args.synthetic_r0,
                                latent_rank=args.synthetic_latent_rank, noise=args.synthetic_noise, seed=args.seed)
    base = collection_param_count(coll.adapters)
    rows = []
    for item in args.synthetic_grid.split(","):
        method, r, k = item.split(":")
        load0 = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        bank = compress_collection(coll.adapters, int(r), int(k), method, args.seed)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        errors = mean_recon_errors(bank)
        found = len({(a, b) for a, b in zip(bank.clusters, coll.labels, strict=True)})
        rows.append({"config": f"{method} r={r} K={k}", "adapters": len(coll.adapters),
                     "bank_pct": round(100 * bank_param_count(bank) / base, 2),
                     "reduction_pct": round(100 - 100 * bank_param_count(bank) / base, 2),
                     "mean_error": round(sum(errors) / len(errors), 4), "max_error": round(max(errors), 4),
                     "fit_wall_s": round(wall, 1), "fit_cpu_s": round(cpu, 1),
                     "load_1min": f"{load0:.1f}-{os.getloadavg()[0]:.1f}", "cluster_label_pairs": found})
        log.info("bench.synthetic", **rows[-1])
    return rows


def versus_paper(jd: list[dict], synthetic: list[dict], n: int) -> str:
    """This run's numbers next to the paper's two headline claims (50 % error; > 95 % compression)."""
    near = [r for r in jd if 0.4 <= r["mean_error"] <= 0.6 and "accuracy_retained" in r]
    small = [r for r in jd if r["bank_pct"] <= 5 and "accuracy_retained" in r]
    parts = []
    if near:
        lo, hi = min(r["accuracy_retained"] for r in near), max(r["accuracy_retained"] for r in near)
        parts.append(f"Here, JD banks with mean error 0.4-0.6 ({len(near)} banks) kept only {100 * lo:.0f}-"
                     f"{100 * hi:.0f} % of the accuracy")
    if small:
        top = max(small, key=lambda r: r["accuracy_retained"])
        parts.append(f"at >= 95 % compression of the {n} trained adapters the best bank (`{top['config']}`, "
                     f"{top['bank_pct']} %) kept {100 * top['accuracy_retained']:.1f} %")
    reach = [r for r in synthetic if r["reduction_pct"] >= 95]
    if reach:
        slowest = max(r["fit_wall_s"] for r in reach)
        parts.append(f"{reach[0]['adapters']} synthetic adapters: {len(reach)} of the {len(synthetic)} scale-grid "
                     f"banks compress >= 95 % (fits <= {slowest} s wall)")
    return ("; ".join(parts) + ".") if parts else ""


def plot(rows: list[dict], budget: float | None, path: Path) -> None:
    """Accuracy kept vs bank size and vs mean reconstruction error (trained phrasings, held-out paraphrases)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for method, k in sorted({(r["method"], r["clusters"] if r["method"] != "svd" else 0) for r in rows}):
        pts = sorted((r["bank_pct"], r["mean_error"], 100 * r["accuracy_retained"], 100 * r["heldout_accuracy_retained"])
                     for r in rows if r["method"] == method and (method == "svd" or r["clusters"] == k))
        label = f"{method} K={k}" if method != "svd" else "per-adapter SVD"
        style = {"full": "-o", "diag": "--s", "svd": ":^"}[method]
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
        by_error = sorted(pts, key=lambda p: p[1])
        axes[1].plot([p[1] for p in by_error], [p[2] for p in by_error], style, label=label)
        axes[2].plot([p[1] for p in by_error], [p[3] for p in by_error], style, label=label)
    axes[0].axvline(20, color="grey", linestyle=":", linewidth=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bank size (% of the adapters' parameters)")
    for ax, what in zip(axes, ("trained phrasings", "trained phrasings", "held-out paraphrases"), strict=True):
        ax.axhline(95, color="red", linestyle=":", linewidth=0.8)
        ax.set_ylabel(f"exact match kept (% of originals, {what})")
        ax.grid(alpha=0.3)
        if ax is not axes[0]:
            ax.set_xlabel("mean squared relative reconstruction error")
            if budget is not None:
                ax.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
    axes[1].set_title(f"dotted: suggested budget {budget}" if budget is not None else "", fontsize=8)
    axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model the adapters were trained on")
    p.add_argument("--adapters", default=None, help="directory of the LoRA job's adapters "
                   "(default ~/.cache/atelier/lora-adapters/<model>)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N adapters by task id (0 = all)")
    p.add_argument("--eval-adapters", type=int, default=0,
                   help="measure accuracy on the first N adapters only (0 = all); banks are fitted on all")
    p.add_argument("--grid", default=None, help="banks to fit and evaluate: method:r:K,... with method full or "
                   f"diag, and svd:r for the per-adapter SVD baseline (default {DEFAULTS['grid']})")
    p.add_argument("--target-accuracy", type=float, default=0.95, help="share of the originals' accuracy to keep")
    p.add_argument("--target-params", type=float, default=0.20, help="max bank size as a share of the adapters")
    p.add_argument("--peft-checks", type=int, default=None, help="adapters exported + evaluated through peft (default 3)")
    p.add_argument("--synthetic-n", type=int, default=None, help="synthetic adapters for the scale test (0 = skip)")
    p.add_argument("--synthetic-grid", default=None, help="method:r:K,... fitted on the synthetic collection "
                   f"(default {DEFAULTS['synthetic_grid']})")
    p.add_argument("--synthetic-clusters", type=int, default=8, help="planted groups in the synthetic collection")
    p.add_argument("--synthetic-latent-rank", type=int, default=16, help="dimension of each group's subspaces")
    p.add_argument("--synthetic-r0", type=int, default=8, help="LoRA rank of the synthetic adapters")
    p.add_argument("--synthetic-noise", type=float, default=0.3, help="per-factor noise (relative Frobenius norm)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 adapters, tiny grid, 40 synthetic adapters; "
                   "writes to a temp dir unless --out is given")
    p.add_argument("--out", default=None, help="results directory (default docs/bench)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="bench-compression-")) if args.quick
                                           else ROOT / "docs" / "bench")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench.common import command_line, write_results
    from cluster.models import load_model, resolve_model
    from compression import bank_param_count, collection_param_count, export_adapter, mean_recon_errors
    from train_jobs import bank_sweep
    from train_jobs.lora_adapters import default_out_dir
    from train_jobs.lora_tasks import LoraTask

    t_run, c_run, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    model_ref = resolve_model(args.model)
    adapters_dir = Path(args.adapters).expanduser() if args.adapters else default_out_dir(model_ref.id)
    adapters = bank_sweep.load_collection(adapters_dir, None, model_ref)
    records = [json.loads((adapters_dir / a.name.rsplit("/", 1)[-1] / "task.json").read_text()) for a in adapters]
    order = sorted(range(len(adapters)), key=lambda i: records[i]["task"]["task_id"])
    order = order[:args.limit] if args.limit else order
    adapters, records = [adapters[i] for i in order], [records[i] for i in order]
    if not adapters:
        raise SystemExit(f"no adapters in {adapters_dir}; fix: run python -m train_jobs.lora_adapters first")
    tasks = [LoraTask.model_validate(r["task"]) for r in records]
    n_eval = min(args.eval_adapters or len(tasks), len(tasks))
    base_params = collection_param_count(adapters)
    lora_rank = max(r for a in adapters for r in a.ranks.values())
    model, tok = load_model(model_ref)
    model.eval()
    log.info("bench.start", adapters=len(adapters), eval_adapters=n_eval, collection_params=base_params,
             out=str(out), load=load_start)

    original, o_wall, o_cpu = build_bank(Spec("original", lora_rank), adapters, model_ref, args.seed)
    with torch.no_grad():
        t = time.perf_counter()
        original_rows = evaluate_bank(model, tok, original, tasks[:n_eval])
    eval_original_s = round(time.perf_counter() - t, 1)
    recorded = [r["metrics"]["accuracy"] for r in records[:n_eval]]
    orig_summary = accuracy_summary(original_rows, original_rows)
    rows = [{"config": "original adapters (exact bank)", "method": "original", "rank": lora_rank, "clusters": 0,
             "bank_params": bank_param_count(original), "bank_pct": round(100 * bank_param_count(original) / base_params, 2),
             "mean_error": round(sum(mean_recon_errors(original)) / len(adapters), 6), "fit_wall_s": o_wall,
             "fit_cpu_s": o_cpu, **orig_summary}]
    log.info("bench.original", eval_s=eval_original_s, **{k: v for k, v in rows[0].items()})

    banks = {}
    for spec in parse_grid(args.grid, len(adapters)):
        bank, wall, cpu = build_bank(spec, adapters, model_ref, args.seed)
        errors = mean_recon_errors(bank)
        row = {"config": spec.label, "method": spec.method, "rank": spec.rank,
               "clusters": spec.clusters if spec.method != "svd" else len(adapters),
               "bank_params": bank_param_count(bank), "bank_pct": round(100 * bank_param_count(bank) / base_params, 2),
               "mean_error": round(sum(errors) / len(errors), 4), "max_error": round(max(errors), 4),
               "fit_wall_s": wall, "fit_cpu_s": cpu}
        with torch.no_grad():
            row.update(accuracy_summary(evaluate_bank(model, tok, bank, tasks[:n_eval]), original_rows))
        rows.append(row)
        banks[spec.label] = bank
        log.info("bench.bank", **row)

    compressed = [r for r in rows if r["method"] in ("full", "diag", "svd")]
    meets = [r for r in compressed if r["bank_pct"] <= 100 * args.target_params
             and r["accuracy_retained"] >= args.target_accuracy]
    best = min(meets, key=lambda r: r["bank_pct"]) if meets else None
    jd = [r for r in compressed if r["method"] != "svd"]
    budget, first_failure = suggest_budget(jd, args.target_accuracy)
    strict, strict_failure = suggest_budget(jd, args.target_accuracy, ("accuracy_retained", "heldout_accuracy_retained"))
    within = [r for r in compressed if r["bank_pct"] <= 100 * args.target_params]
    top = max(within, key=lambda r: (r["accuracy_retained"], -r["bank_pct"])) if within else None
    pairs = [{"K": f["clusters"], "per-adapter numbers per module": f["rank"] ** 2,
              "full": f"{f['config']}: err {f['mean_error']}, kept {f['accuracy_retained']}, {f['bank_pct']} %",
              "diag": f"{d['config']}: err {d['mean_error']}, kept {d['accuracy_retained']}, {d['bank_pct']} %"}
             for f in compressed if f["method"] == "full" for d in compressed
             if d["method"] == "diag" and d["clusters"] == f["clusters"] and d["rank"] == f["rank"] ** 2]

    checks = []
    checked = best or (max(jd, key=lambda r: (r["accuracy_retained"], -r["bank_pct"])) if jd else None)
    check_specs = [("original", original, adapters_dir)] + ([(checked["config"], banks[checked["config"]], None)]
                                                           if checked else [])
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for label, bank, src in check_specs:
            for i in range(min(args.peft_checks, n_eval)):
                name = adapters[i].name
                peft_dir = src / name.rsplit("/", 1)[-1] if src else export_adapter(bank, name, Path(tmp) / f"{i}")
                checks.append({"bank": label, "peft_dir": "original adapter dir" if src else "export_adapter",
                               **peft_check(model, tok, bank, i, tasks[i], peft_dir)})
                log.info("bench.peft_check", **checks[-1])

    synthetic = synthetic_scale(dict(adapters[0].shapes), args) if args.synthetic_n else []
    wall_run, cpu_run = time.perf_counter() - t_run, time.process_time() - c_run

    out.mkdir(parents=True, exist_ok=True)
    bank_sweep.plot([r for r in compressed if r["method"] != "svd"], base_params,
                    budget if budget is not None else bank_sweep.DEFAULT_BUDGET, out / "compression_error.png")
    plot(compressed, budget, out / "compression.png")
    command = command_line("bench.compression", argv)
    pct = lambda r, k="accuracy_retained": f"{100 * r[k]:.1f} %"  # noqa: E731
    verdict = (f"**Target met** (>= {100 * args.target_accuracy:.0f} % of the originals' mean exact-match accuracy "
               f"on the trained phrasings at <= {100 * args.target_params:.0f} % of their parameters): smallest such "
               f"bank `{best['config']}` stores {best['bank_pct']} % and keeps {pct(best)} "
               f"({pct(best, 'heldout_accuracy_retained')} on held-out paraphrases)" if best else
               f"**Target NOT met**: no bank <= {100 * args.target_params:.0f} % of the parameters kept "
               f">= {100 * args.target_accuracy:.0f} % of the accuracy")
    if top:
        verdict += (f"; most accurate bank within {100 * args.target_params:.0f} %: `{top['config']}` at "
                    f"{top['bank_pct']} %, keeps {pct(top)} ({pct(top, 'heldout_accuracy_retained')} held-out).")

    def budget_line(what: str, value, failure) -> str:
        text = (f"every measured JD bank with mean error <= **{value}** kept >= {100 * args.target_accuracy:.0f} % "
                f"of the accuracy on {what}" if value is not None else
                f"even the lowest-error JD bank missed {100 * args.target_accuracy:.0f} % on {what}")
        if failure:
            text += (f"; the lowest-error bank that missed it: `{failure['config']}` (mean error "
                     f"{failure['mean_error']}, kept {pct(failure)} trained, "
                     f"{pct(failure, 'heldout_accuracy_retained')} held-out)")
        return text

    budget_text = (f"Error budget: {budget_line('the trained phrasings', budget, first_failure)} "
                   "(`suggested_budget`; `train_jobs.bank_sweep.DEFAULT_BUDGET` is set from it). Stricter, "
                   f"{budget_line('trained AND held-out phrasings', strict, strict_failure)}.")
    syn = synthetic[0] if synthetic else None
    notes = "\n\n".join(filter(None, [
        verdict, budget_text,
        f"Collection: {len(adapters)} trained adapters of `{model_ref.id}` from `{adapters_dir}` (LoRA rank "
        f"{lora_rank}, modules {len(adapters[0].shapes)}: {sorted({m.rsplit('.', 1)[-1] for m in adapters[0].shapes})}"
        f"), {base_params:,} parameters. Accuracy measured on {n_eval} adapters x {len(tasks[0].eval)} questions "
        f"through `attach_bank` (BankLinear, one adapter per forward). Originals re-measured here: mean "
        f"{rows[0]['accuracy']:.4f} (trained phrasings) vs {sum(recorded) / len(recorded):.4f} recorded by the "
        "training job; original = the adapters as an exact bank (per-adapter SVD at their own rank). "
        "`kept` = mean accuracy of the bank's adapters / mean of the originals; `agree` = share of questions "
        "whose greedy answer (answer token + end of turn) equals the original adapter's.",
        "JD-Full vs JD-Diag at equal per-adapter size (Σ_i: r² numbers for Full, r for Diag):\n\n"
        + markdown_table(pairs, list(pairs[0])) if pairs else "",
        "PEFT export checks (bank op vs the same adapter loaded by `peft`):\n\n" + markdown_table(
            checks, ["bank", "adapter", "peft_dir", "answers_equal", "max_abs_logit_diff", "logit_scale"]) if checks else "",
        (f"Scale ({syn['adapters']} STRUCTURED SYNTHETIC adapters, `compression.synthetic_collection`: "
         f"{args.synthetic_clusters} planted groups, latent rank {args.synthetic_latent_rank}, r0={args.synthetic_r0}, "
         f"noise {args.synthetic_noise}, the real collection's {len(adapters[0].shapes)} module shapes; not trained, "
         f"so their errors say nothing about task accuracy); torch threads {args.threads}, 2-core box shared with "
         "other jobs (1-min load average before-after each fit):\n\n" + markdown_table(synthetic, list(synthetic[0])))
        if syn else "",
        PAPER + " " + versus_paper(jd, synthetic, len(adapters)),
        f"Whole run: {wall_run / 60:.1f} min wall, {cpu_run / 60:.1f} min CPU (this process); load average "
        f"{load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end on {os.cpu_count()} cores. Plots: "
        "`compression.png` (accuracy kept vs size and vs error), `compression_error.png` (error vs size per K).",
    ]))
    cols = {"config": "config", "bank_pct": "bank % of params", "mean_error": "mean err", "max_error": "max err",
            "fit_wall_s": "fit wall s", "fit_cpu_s": "fit CPU s", "accuracy": "exact (trained)",
            "accuracy_retained": "kept", "heldout_accuracy": "exact (held-out)",
            "heldout_accuracy_retained": "kept (held-out)", "answer_agreement": "agree",
            "min_adapter_accuracy": "worst adapter"}
    payload = {"args": vars(args), "adapters": len(adapters), "eval_adapters": n_eval, "collection_params": base_params,
               "lora_rank": lora_rank, "recorded_mean_accuracy": sum(recorded) / len(recorded),
               "banks": rows, "target": {"accuracy": args.target_accuracy, "params": args.target_params,
                                         "met_by": best, "met": best is not None},
               "suggested_budget": budget, "first_failure": first_failure,
               "budget_with_heldout": strict, "first_failure_with_heldout": strict_failure, "full_vs_diag": pairs,
               "peft_checks": checks, "synthetic": synthetic, "paper": PAPER,
               "versus_paper": versus_paper(jd, synthetic, len(adapters)),
               "run": {"wall_s": round(wall_run, 1), "cpu_s": round(cpu_run, 1), "load_start": load_start,
                       "load_end": os.getloadavg(), "threads": args.threads}}
    write_results(out, "compression", payload, [{v: r.get(k, "") for k, v in cols.items()} for r in rows],
                  f"LoRA compression: {len(adapters)} trained adapters of {model_ref.id}", command, notes)
    log.info("bench.done", out=str(out), met=best is not None, budget=budget, wall_s=round(wall_run, 1))
    print((out / "compression.md").read_text())
    return payload


if __name__ == "__main__":
    main()
