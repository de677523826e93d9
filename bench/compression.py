"""LoRA-collection compression on trained adapters: held-out accuracy kept vs parameters stored, side by
side with SHARE, and the serving budget. (Scale to 1000 adapters: ``bench/compression_scale.py``.)

One run, three parts:

1. Trained adapters (``python -m train_jobs.lora_adapters``; the bench reports how long that took).
   Banks of a grid: Atelier's JD-Full / JD-Diag (rank r × clusters K), the per-adapter SVD baseline
   and SHARE (arXiv 2602.06043) via ``lorashare`` (and ``vlora-dev``), fitted on the same 100
   adapters, every one evaluated the same way: through ``compression.attach_bank`` on the base model,
   one adapter per forward, exact match on trained phrasings, VALIDATION paraphrases and TEST
   paraphrases (``compression.codebook.tasks``). Baseline, same run, same op: the original adapters as an
   exact bank. Plus the time to add one new adapter, per method.
2. Served = uploaded: each JD bank served at error budgets b (adapters over b stored exactly, as the
   service does); the per-adapter budget is chosen on validation paraphrases
   (``compression.DEFAULT_ERROR_BUDGET`` comes from it), the headline is on test paraphrases: per
   method and size limit, the config chosen on validation and its test score.
3. PEFT checks: exported adapters (compressed and exact) give the bank's answers through peft.

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
from compression.jd import METHODS

ROOT = Path(__file__).resolve().parent.parent
log = get_logger("bench.compression")
PAPER = ("Compress then Serve (arXiv 2407.00066, v4 / ICML 2025) claims up to 1000 LoRAs served jointly and over 95 % "
         "compression with 500 and 1000 LoRAs (slides), and \"up to 50 % reconstruction error preserves the "
         "performance\" (Mistral-7B, r=16 q/k/v LoRAs on Natural-Instructions). SHARE (arXiv 2602.06043) claims up to "
         "100x parameter reduction.")
DEFAULTS = {"limit": 0, "score_adapters": 0, "peft_checks": 2,
            # sizes (% of the 100 SmolLM2 adapters) from ~2.5 to ~20 for every method, a few beyond; lowrank r=K
            # configs store exactly what SHARE k=r stores at K=1 (r(d_in+d_out) bases + 2rR per adapter/module)
            "grid": "full:8:1,full:16:1,full:32:1,full:24:2,full:8:4,full:12:4,full:16:4,full:20:4,full:24:4,"
                    "full:12:8,full:16:8,diag:128:1,diag:20:4,diag:28:4,diag:32:4,diag:36:4,lowrank:32:1,"
                    "lowrank:48:1,lowrank:62:1,lowrank:22:2,lowrank:34:2,lowrank:44:2,lowrank:14:4,lowrank:21:4,"
                    "lowrank:28:4,lowrank:12:8,lowrank:16:8,svd:1,svd:2,share:8,share:16,share:24,share:32,"
                    "share:48,share:62,vlora:4,vlora:19"}
QUICK = {"limit": 8, "score_adapters": 0, "peft_checks": 1, "grid": "full:2:1,full:4:1,full:2:2,diag:4:1,lowrank:6:1,svd:1,share:4,vlora:2"}
BUDGETS = (0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3)
SIZES = (2.5, 5.0, 10.0, 15.0, 20.0)
LABELS = {"served": "Atelier served (JD + exact over budget)", "full": "JD-Full (clusters)",
          "diag": "JD-Diag (clusters)", "lowrank": "JD-Full, rank-R core Σ (clusters)", "svd": "per-adapter SVD", "share": "SHARE (lorashare)",
          "vlora": "SHARE (vlora-dev)"}


@dataclass(frozen=True)
class Spec:
    """One bank: method full | diag (rank, clusters) | svd (rank) | share / vlora (k components) | original."""

    method: str
    rank: int
    clusters: int = 1

    @property
    def label(self) -> str:
        if self.method in ("svd", "original"):
            return f"{self.method} r={self.rank}"
        if self.method in ("share", "vlora"):
            return f"{self.method} k={self.rank}"
        return f"{self.method} r={self.rank} K={self.clusters}"


def parse_grid(text: str, n: int) -> list[Spec]:
    """'method:r:K,...' (svd:r, share:k, vlora:k) -> specs; K > n is dropped."""
    specs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        if parts[0] not in (*METHODS, "svd", "share", "vlora") or len(parts) != (3 if parts[0] in METHODS else 2):
            raise SystemExit(f"--grid item {item!r}: expected full|diag|lowrank:r:K, svd:r, share:k or vlora:k")
        specs.append(Spec(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else n))
    return [s for s in specs if s.clusters <= n]


def scored_indices(n: int, k: int) -> list[int]:
    """k adapters of n spread evenly over the task ids (k = 0 or k >= n: all): the ones every bank is scored on.
    Banks are always fitted on all n; scoring fewer only cuts evaluation time (each adapter x split x bank)."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted({round(i * n / k) for i in range(k)})


def build_bank(spec: Spec, adapters: list, model, seed: int):
    """(bank, fit wall s, fit CPU s) for a JD / SVD / original spec, pinned to the base model."""
    from compression import compress_collection, svd_bank

    pin = {"base_model": model.id, "base_model_hash": model.content_hash}
    t, c = time.perf_counter(), time.process_time()
    if spec.method in ("svd", "original"):
        bank = svd_bank(adapters, spec.rank, **pin)
    else:
        bank = compress_collection(adapters, spec.rank, spec.clusters, spec.method, seed, **pin)
    return bank, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def peft_check(model, tok, bank, name: str, task, peft_dir: Path) -> dict:
    """Bank path vs a PEFT directory loaded by peft, for one adapter: same answers? max |Δ logit|?"""
    from peft import PeftModel

    from compression import attach_bank
    from compression.codebook.tasks import eval_logits

    handle = attach_bank(model, bank)
    try:
        with handle.using_one(name):
            bank_logits = eval_logits(model, tok, task)
    finally:
        handle.detach()
    peft_model = PeftModel.from_pretrained(model, str(peft_dir))
    try:
        peft_logits = eval_logits(peft_model, tok, task)
    finally:
        peft_model.unload()
    same = (bank_logits.argmax(-1) == peft_logits.argmax(-1)).all(-1).float().mean()
    return {"adapter": name, "answers_equal": round(float(same), 4),
            "max_abs_logit_diff": float((bank_logits - peft_logits).abs().max()),
            "logit_scale": float(peft_logits.abs().max())}


def suggest_budget(rows: list[dict], target: float, keys: tuple[str, ...] = ("train_kept",)
                   ) -> tuple[float | None, dict | None]:
    """(e, first failure): e is the largest BANK-mean error such that every evaluated bank with mean error <= e
    keeps >= target on every metric in `keys` (None: the lowest-error bank already misses it)."""
    ok_until = None
    for r in sorted((r for r in rows if all(k in r for k in keys)), key=lambda r: r["mean_error"]):
        if min(r[k] for k in keys) < target:
            return ok_until, r
        ok_until = r["mean_error"]
    return ok_until, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model the adapters were trained on")
    p.add_argument("--adapters", default=None, help="directory of the LoRA job's adapters "
                   "(default ~/.cache/atelier/lora-adapters/<model>)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N adapters by task id (0 = all)")
    p.add_argument("--score-adapters", type=int, default=None, help="score banks on N of the adapters, spread "
                   "evenly over task ids (0 = all); every bank is still fitted on all of them")
    p.add_argument("--grid", default=None, help="banks: full:r:K, diag:r:K, lowrank:r:K, svd:r, share:k (lorashare), vlora:k "
                   f"(vlora-dev), comma-separated (default {DEFAULTS['grid']})")
    p.add_argument("--target-accuracy", type=float, default=0.95, help="share of the originals' accuracy to keep")
    p.add_argument("--target-params", type=float, default=0.20, help="max bank size as a share of the adapters")
    p.add_argument("--budget-bin", type=int, default=100, help="adapters per error bin when choosing the budget")
    p.add_argument("--peft-checks", type=int, default=None, help="adapters exported + evaluated through peft per bank")
    p.add_argument("--add-adapters", type=int, default=10, help="adapters timed when adding one new adapter")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 adapters, tiny grids; writes to a temp dir "
                   "unless --out is given")
    p.add_argument("--out", default=None, help="results directory (default docs/bench)")
    return p


def main(argv: list[str] | None = None) -> dict:
    from bench.compression_report import parse_bench_args

    args, out = parse_bench_args(build_parser(), argv, DEFAULTS, QUICK, "bench-compression-", ROOT)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bench import compression_baselines as baselines
    from bench import compression_eval as ev
    from bench.common import command_line, write_results
    from bench.compression_report import report
    from cluster.banks import model_linear_shapes
    from cluster.models import load_model, resolve_model
    from cluster.settings import load_settings
    from compression import (
        DEFAULT_ERROR_BUDGET,
        bank_param_count,
        collection_param_count,
        export_adapter,
        load_peft_adapter,
        mean_recon_errors,
        serve_within_budget,
    )
    from compression.codebook.store import default_out_dir
    from compression.codebook.tasks import LoraTask

    t_run, c_run, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    model_ref = resolve_model(args.model)
    shapes = model_linear_shapes(str(model_ref.path))
    adapters_dir = (Path(args.adapters).expanduser() if args.adapters
                    else default_out_dir(model_ref.id, load_settings().home))
    dirs = sorted((d for d in adapters_dir.iterdir() if (d / "task.json").exists()),
                  key=lambda d: json.loads((d / "task.json").read_text())["task"]["task_id"])
    dirs = dirs[:args.limit] if args.limit else dirs
    if not dirs:
        raise SystemExit(f"no adapters in {adapters_dir}; fix: run python -m train_jobs.lora_adapters first")
    records = [json.loads((d / "task.json").read_text()) for d in dirs]
    tasks = [LoraTask.model_validate(r["task"]) for r in records]
    names = [f"{t.tenant}/{d.name}" for t, d in zip(tasks, dirs, strict=True)]
    adapters = [load_peft_adapter(d, name=n, base_shapes=shapes) for d, n in zip(dirs, names, strict=True)]
    index = json.loads((adapters_dir / "index.json").read_text()) if (adapters_dir / "index.json").exists() else {}
    base_params = collection_param_count(adapters)
    lora_rank = max(r for a in adapters for r in a.ranks.values())
    model, tok = load_model(model_ref)
    model.eval()
    scored = scored_indices(len(adapters), args.score_adapters)
    s_tasks, s_names = [tasks[i] for i in scored], [names[i] for i in scored]
    log.info("bench.start", adapters=len(adapters), scored=len(scored), collection_params=base_params, out=str(out),
             load=load_start)

    original, o_wall, o_cpu = build_bank(Spec("original", lora_rank), adapters, model_ref, args.seed)
    t = time.perf_counter()
    orig_rows = ev.evaluate_bank(model, tok, original, s_tasks, s_names)
    eval_s = round(time.perf_counter() - t, 1)
    rows = [{"config": "original adapters (exact bank)", "method": "original", "bank_pct": 100.0, "mean_error": 0.0,
             "max_error": 0.0, "fit_wall_s": o_wall, "fit_cpu_s": o_cpu, **ev.summarize(orig_rows, orig_rows)}]
    log.info("bench.original", eval_s=eval_s, **rows[0])

    add_new = adapters[:args.add_adapters]
    add_times: dict[str, list[float]] = {"svd": baselines.svd_add_times(add_new, 1)}
    jd, per_adapter = {}, {}
    for spec in parse_grid(args.grid, len(adapters)):
        if spec.method in ("share", "vlora"):
            if spec.method == "share":
                fit = baselines.lorashare_baseline(dict(zip(names, dirs, strict=True)), adapters, spec.rank,
                                                   dict(zip(names[:args.add_adapters], dirs, strict=False)), shapes)
            else:
                fit = baselines.vlora_baseline(adapters, spec.rank, add_new)
            bank, params, wall, cpu = baselines.rebuilt_bank(fit, lora_rank, model_ref), fit.stored_params, \
                fit.fit_wall_s, fit.fit_cpu_s
            add_times.setdefault(spec.method, []).extend(fit.add_one_s)
            errors = [sum(e.values()) / len(e) for e in baselines.rebuild_errors(adapters, fit.adapters)]
        else:
            bank, wall, cpu = build_bank(spec, adapters, model_ref, args.seed)
            params = bank_param_count(bank)
            errors = mean_recon_errors(bank)
        bank_rows = ev.evaluate_bank(model, tok, bank, s_tasks, s_names)
        row = {"config": spec.label, "method": spec.method, "bank_pct": round(100 * params / base_params, 2),
               "mean_error": round(sum(errors) / len(errors), 4), "max_error": round(max(errors), 4),
               "fit_wall_s": wall, "fit_cpu_s": cpu, **ev.summarize(bank_rows, orig_rows)}
        rows.append(row)
        s_errors = [errors[i] for i in scored]
        per_adapter[spec.label] = [{"adapter": r["name"], "error": round(e, 5),
                                    **{k: r[k] for k in ev.SPLITS.values()}} for r, e in zip(bank_rows, s_errors,
                                                                                              strict=True)]
        if spec.method in METHODS:
            jd[spec.label] = (bank, bank_rows, s_errors)
        log.info("bench.bank", **row)

    # served = uploaded: each JD bank at each budget; the budget itself is chosen on validation paraphrases
    pairs = [(e, r["heldout_accuracy"], o["heldout_accuracy"]) for _, b_rows, errs in jd.values()
             for r, o, e in zip(b_rows, orig_rows, errs, strict=True)]
    chosen_budget, budget_bins = ev.adapter_budget(pairs, args.target_accuracy, args.budget_bin)
    served = []
    for label, (bank, b_rows, errs) in jd.items():
        for budget in sorted({*BUDGETS, *([chosen_budget] if chosen_budget else [])}):
            s_bank = serve_within_budget(bank, adapters, budget)
            s_rows = ev.served_rows(b_rows, orig_rows, errs, budget)
            served.append({"config": f"served {label} @{budget:g}", "method": "served", "base": label,
                           "budget": budget, "exact": len(s_bank.exact),
                           "bank_pct": round(100 * bank_param_count(s_bank) / base_params, 2),
                           **ev.summarize(s_rows, orig_rows)})
    compared = [r for r in rows[1:]] + served
    best = ev.best_at_sizes(compared, list(SIZES))
    ev.plot_methods(compared, LABELS, chosen_budget, out / "compression.png", "test_kept",
                    "held-out TEST paraphrases; configs chosen on validation (best_at_sizes); served = any budget")
    ev.plot_methods(compared, LABELS, chosen_budget, out / "compression_val.png", "val_kept",
                    "held-out VALIDATION paraphrases (where configs and the budget are chosen)")

    # PEFT checks: the original, the best compressed JD bank within the size target, and its served form
    checks = []
    within = [r for r in rows if r["method"] in METHODS and r["bank_pct"] <= 100 * args.target_params]
    top = max(within, key=lambda r: r["val_kept"])["config"] if within else None
    check_banks = [("original", original, True)]
    if top:  # time adding one new adapter to it (the bank a pool would serve)
        add_times.update({f"jd_{k}": v for k, v in baselines.jd_add_times(
            jd[top][0], add_new, chosen_budget if chosen_budget is not None else DEFAULT_ERROR_BUDGET).items()})
        check_banks.append((top, jd[top][0], False))
        if chosen_budget is not None:
            check_banks.append((f"served {top} @{chosen_budget:g}", serve_within_budget(jd[top][0], adapters,
                                                                                        chosen_budget), False))
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for label, bank, own_dir in check_banks:
            picks = list(range(min(args.peft_checks, len(names))))
            picks += [bank.index(a) for a in list(bank.exact)[:1]]  # an exact adapter too, when there is one
            for i in picks:
                name = bank.adapters[i]
                j = names.index(name)
                peft_dir = dirs[j] if own_dir else export_adapter(bank, name, Path(tmp) / f"{len(checks)}")
                checks.append({"bank": label, "exact": name in bank.exact,
                               "peft_dir": "original adapter dir" if own_dir else "export_adapter",
                               **peft_check(model, tok, bank, name, tasks[j], peft_dir)})
                log.info("bench.peft_check", **checks[-1])

    wall_run, cpu_run = time.perf_counter() - t_run, time.process_time() - c_run

    command = command_line("bench.compression", argv)
    payload = {
        "args": vars(args), "adapters": len(adapters), "scored": s_names, "collection_params": base_params, "lora_rank": lora_rank,
        "rebuild": {"command": "python -m train_jobs.lora_adapters --model smollm2-135m --num-adapters 100",
                    "index_run": index.get("run"), "summary": index.get("summary"),
                    "train_cpu_s_sum": round(sum(r["metrics"].get("cpu_seconds_total", 0) for r in records), 1)},
        "share_packages": baselines.installed_versions(), "banks": rows, "served": served,
        "best_at_sizes": best, "budget": {"chosen": chosen_budget, "default": DEFAULT_ERROR_BUDGET, **budget_bins},
        "bank_mean_budget": dict(zip(("trained", "first_failure"), suggest_budget(
            [r for r in rows if r["method"] in METHODS], args.target_accuracy), strict=True)),
        "add_one_s": {k: {"median": round(baselines.median(v), 5), "n": len(v)} for k, v in add_times.items()},
        "per_adapter": per_adapter, "peft_checks": checks, "paper": PAPER,
        "run": {"wall_s": round(wall_run, 1), "cpu_s": round(cpu_run, 1), "load_start": load_start,
                "load_end": os.getloadavg(), "threads": args.threads, "eval_original_s": eval_s}}
    table, notes = report(payload, args, LABELS, SIZES)
    write_results(out, "compression", payload, table, f"LoRA compression: {len(adapters)} trained adapters of "
                  f"{model_ref.id}, held-out accuracy kept, side by side with SHARE", command, notes)
    log.info("bench.done", out=str(out), budget=chosen_budget, wall_s=round(wall_run, 1))
    print((out / "compression.md").read_text())
    return payload


if __name__ == "__main__":
    main()
