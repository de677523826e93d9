"""The Markdown of bench/compression.py: verdicts first, then every table the run measured."""

from __future__ import annotations

import os

ATELIER = ("served", "full", "diag", "lowrank", "svd")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of ``cols`` (missing values empty)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows])


def _verdicts(p: dict, args, labels: dict, sizes) -> list[str]:
    best = p["best_at_sizes"]
    at = {(r["method"], r["size_limit_pct"]): r for r in best}
    limit = 100 * args.target_params
    out = []
    atelier = [at[(m, limit)] for m in ATELIER if (m, limit) in at]
    if atelier:
        top = max(atelier, key=lambda r: r["val_kept"])
        met = top["test_kept"] >= args.target_accuracy
        out.append(
            f"**Held-out headline ({'target met' if met else 'target NOT met'})**: within {limit:.0f} % of the "
            f"parameters, the configuration chosen on the validation paraphrases is `{top['config']}` "
            f"({top['bank_pct']} %); it keeps **{_pct(top['test_kept'])} of the originals' exact match on the TEST "
            f"paraphrases** ({_pct(top['val_kept'])} validation, {_pct(top['train_kept'])} trained phrasings). "
            f"Target: >= {100 * args.target_accuracy:.0f} % held-out at <= {limit:.0f} %.")
    share_rows = []
    for size in sizes:
        ours = [at[(m, size)] for m in ATELIER if (m, size) in at]
        share = at.get(("share", size))
        if not ours or share is None:
            continue
        mine = max(ours, key=lambda r: r["val_kept"])
        share_rows.append({"size <=": f"{size:g} %",
                           "Atelier best (chosen on validation)": f"`{mine['config']}` {mine['bank_pct']} %: "
                                                                  f"{_pct(mine['test_kept'])}",
                           "SHARE (lorashare)": f"`{share['config']}` {share['bank_pct']} %: {_pct(share['test_kept'])}",
                           "ahead": "Atelier" if mine["test_kept"] > share["test_kept"] else
                           ("tie" if mine["test_kept"] == share["test_kept"] else "SHARE")})
    if share_rows:
        wins = [r["size <="] for r in share_rows if r["ahead"] == "SHARE"]
        ties = [r["size <="] for r in share_rows if r["ahead"] == "tie"]
        out.append(("**Versus SHARE** (same adapters, same scoring, same run; test paraphrases kept): "
                    + ("Atelier's best is ahead at every size limit." if not wins and not ties else
                       "; ".join(x for x in (f"SHARE is ahead at {', '.join(wins)}" if wins else "",
                                             f"tied at {', '.join(ties)}" if ties else "") if x)
                       + " (elsewhere Atelier's best is ahead).")) + "\n\n"
                   + markdown_table(share_rows, list(share_rows[0])))
    return out


def report(p: dict, args, labels: dict, sizes) -> tuple[list[dict], str]:
    """(main table rows, Markdown notes) for write_results."""
    cols = {"config": "config", "bank_pct": "stored % of params", "mean_error": "mean err", "max_error": "max err",
            "fit_wall_s": "fit wall s", "train_kept": "kept (trained)", "val_kept": "kept (validation)",
            "test_kept": "kept (TEST)", "agreement": "answers = original", "worst_adapter_train": "worst adapter"}
    table = [{v: r.get(k, "") for k, v in cols.items()} for r in p["banks"]]
    parts = _verdicts(p, args, labels, sizes)
    scored = p.get("scored") or []
    parts.insert(0, f"**Scored adapters**: every bank is fitted on all {p['adapters']} adapters (mean/max err over "
                 f"all of them); accuracy is scored on "
                 + (f"all {p['adapters']}." if len(scored) in (0, p["adapters"]) else
                    f"{len(scored)} of them, spread evenly over task ids (`--score-adapters {len(scored)}`: "
                    f"{', '.join(n.split('/')[-1] for n in scored)}), every split of each; \"kept\" is relative to "
                    "the originals on the same adapters."))
    b = p["budget"]
    served_at = [r for r in p["served"] if r["budget"] == b["chosen"]]
    parts.append(
        f"**Serving budget** (per adapter, chosen on VALIDATION paraphrases): compressed adapters sorted by error, "
        f"bins of {b['bin_size']}; the budget is the top error of the last bin that keeps >= "
        f"{100 * b['target']:.0f} %: **{b['chosen']}** (`compression.DEFAULT_ERROR_BUDGET` = {b['default']}).\n\n"
        + markdown_table(b["bins"], ["error_from", "error_to", "n", "kept"]) + "\n\n"
        + "Every JD bank served at that budget (adapters over it stored exactly; the size includes their exact "
        "clusters; test paraphrases never used to choose anything):\n\n"
        + markdown_table(served_at, ["config", "exact", "bank_pct", "train_kept", "val_kept", "test_kept", "agreement"]))
    parts.append("Best configuration per method and size limit (chosen on validation, reported on test):\n\n"
                 + markdown_table(p["best_at_sizes"], ["method", "size_limit_pct", "config", "bank_pct", "val_kept",
                                               "test_kept", "train_kept"]))
    adds = p["add_one_s"]
    parts.append("Time to add one new adapter (median seconds over the timed adapters, 1 thread): " + ", ".join(
        f"{k} {v['median'] * 1000:.1f} ms (n={v['n']})" for k, v in adds.items())
        + ". `jd_projection`: `compression.add_adapter` (closed-form projection onto the best shared cluster of the "
        "PEFT-checked JD bank below); `jd_within_budget`: the serving path (`add_within_budget`: projection, exact "
        "copy if over the budget); "
        "`share`: lorashare `add_adapter` projection path; `vlora`: `SharedSubspace.project`; `svd`: its own SVD.")
    versions = p["share_packages"]
    parts.append(f"SHARE packages: lorashare {versions.get('lorashare')}, vlora-dev {versions.get('vlora-dev')} (PyPI). "
                 "lorashare = PCA of factor columns per (module, side), loadings k×r per adapter and side (the SHARE "
                 "line); vlora-dev = PCA of the flattened factor matrices, a k-vector per adapter and side, which "
                 "assumes aligned factors: independently trained LoRAs (different random inits) are not aligned, so "
                 "its reconstructions are poor here by construction.")
    if p["peft_checks"]:
        parts.append("PEFT export checks (bank op vs the same adapter loaded by `peft`):\n\n" + markdown_table(
            p["peft_checks"], ["bank", "adapter", "exact", "peft_dir", "answers_equal", "max_abs_logit_diff",
                               "logit_scale"]))
    rb = p["rebuild"]
    run = rb.get("index_run") or {}
    parts.append(f"The 100 trained adapters: `{rb['command']}` (add `--workers N` for N Ray Train workers; "
                 f"resumable cache under ~/.cache/atelier/lora-adapters). The run that built these took "
                 f"{run.get('seconds', 'n/a')} s wall with {run.get('workers', 'n/a')} worker(s) "
                 f"({rb['train_cpu_s_sum']} s CPU summed over adapters). Their originals: "
                 f"{_pct(p['banks'][0]['train_exact'])} exact match on trained phrasings, "
                 f"{_pct(p['banks'][0]['val_exact'])} validation, {_pct(p['banks'][0]['test_exact'])} test paraphrases.")
    parts.append(p["paper"])
    r = p["run"]
    parts.append(f"Whole run: {r['wall_s'] / 60:.1f} min wall, {r['cpu_s'] / 60:.1f} min CPU (this process); load "
                 f"average {r['load_start'][0]:.1f} at start, {r['load_end'][0]:.1f} at end on {os.cpu_count()} cores. "
                 "Plots: `compression.png` (test kept vs size, one line per method), `compression_val.png` "
                 "(validation). Scale to 1000 adapters: `compression_scale.md` (`python -m bench.compression_scale`).")
    return table, "\n\n".join(parts)


def parse_bench_args(parser, argv: list[str] | None, defaults: dict, quick: dict, temp_prefix: str, root):
    """(args, out dir): ``--quick`` or full defaults for every knob left unset; ``--out``, else a temp dir
    for quick runs, else ``<root>/docs/bench`` (created)."""
    import tempfile
    from pathlib import Path

    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix=temp_prefix)) if args.quick
                                           else Path(root) / "docs" / "bench")
    out.mkdir(parents=True, exist_ok=True)
    return args, out
