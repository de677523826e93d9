"""Accuracy of compressed banks, per adapter and per split, for bench/compression.py.

Every bank is evaluated the way serving runs it (``compression.attach_bank`` on the base model, one
adapter per forward). Scores per adapter: exact match on the trained phrasings (``accuracy``), on
the validation paraphrases (``heldout_accuracy``: designs and the error budget are chosen on them)
and on the test paraphrases (``test_accuracy``: final numbers only), plus the greedy answers.

* ``served_rows``: what a pool serves at an error budget b (``compression.serve_within_budget``):
  adapters whose error exceeds b are exact, i.e. answer as the originals do; the bank grows by
  their exact clusters. Computed from the bank's and the originals' per-adapter results.
* ``adapter_budget``: the per-adapter error budget, from (error, kept) pairs on validation.
* ``best_at_sizes``: per method and size limit, the config chosen on validation, with its test score.
"""

from __future__ import annotations

SPLITS = {"train": "accuracy", "val": "heldout_accuracy", "test": "test_accuracy"}


def evaluate_bank(model, tok, bank, tasks: list, names: list[str]) -> list[dict]:
    """Per adapter (task i is adapter names[i]): its three exact-match scores and greedy answers [N, 2]."""
    import torch

    from compression import attach_bank
    from compression.codebook.tasks import eval_logits, score_logits

    handle = attach_bank(model, bank)
    rows = []
    try:
        with torch.no_grad():
            for name, task in zip(names, tasks, strict=True):
                with handle.using_one(name):
                    logits = eval_logits(model, tok, task)
                scores = score_logits(logits, tok, task)
                rows.append({"name": name, **{k: scores[k] for k in SPLITS.values()}, "answers": logits.argmax(-1)})
    finally:
        handle.detach()
    return rows


def summarize(rows: list[dict], original: list[dict]) -> dict:
    """Mean scores, their ratio to the originals' ("kept") per split, and answer agreement."""
    def mean(key, rs):
        return sum(r[key] for r in rs) / len(rs)

    out = {}
    for split, key in SPLITS.items():
        out[f"{split}_exact"] = round(mean(key, rows), 4)
        out[f"{split}_kept"] = round(mean(key, rows) / max(mean(key, original), 1e-9), 4)
    same = [float((r["answers"] == o["answers"]).all(-1).float().mean()) for r, o in zip(rows, original, strict=True)]
    out["agreement"] = round(sum(same) / len(same), 4)
    out["worst_adapter_train"] = min(r["accuracy"] for r in rows)
    return out


def served_rows(bank_rows: list[dict], original: list[dict], errors: list[float], budget: float) -> list[dict]:
    """Per-adapter results of the bank served at ``budget``: over-budget adapters answer as the originals."""
    return [o if e > budget else r for r, o, e in zip(bank_rows, original, errors, strict=True)]


def adapter_budget(pairs: list[tuple[float, float, float]], target: float, bin_size: int = 100
                   ) -> tuple[float | None, dict]:
    """The per-adapter error budget from (error, accuracy, original accuracy) of compressed adapters on
    validation paraphrases.

    Adapters are sorted by error and cut into consecutive bins of ``bin_size``; a bin keeps
    Σ accuracy / Σ original accuracy. The budget is the largest error of the last bin before the
    first bin that keeps < ``target`` (None: the first bin misses). An adapter served compressed at an
    error up to the budget then keeps >= target of its accuracy, judged among adapters of similar
    error (not diluted by near-exact ones)."""
    ordered = sorted(pairs)
    bins = [ordered[i:i + bin_size] for i in range(0, len(ordered), bin_size)]
    budget, table = None, []
    for b in bins:
        kept = sum(a for _, a, _ in b) / max(sum(o for _, _, o in b), 1e-9)
        table.append({"error_from": round(b[0][0], 5), "error_to": round(b[-1][0], 5), "n": len(b),
                      "kept": round(kept, 4)})
        if kept < target:
            break
        budget = b[-1][0]
    return budget, {"bins": table, "bin_size": bin_size, "target": target}


def best_at_sizes(rows: list[dict], sizes: list[float], choose_on: str = "val_kept",
                  report: tuple[str, ...] = ("val_kept", "test_kept", "train_kept")) -> list[dict]:
    """Per method and size limit (bank % of the collection): the config with the best ``choose_on`` among
    those at most that size, with its other scores (chosen on validation, reported on test)."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        for size in sizes:
            fits = [r for r in rows if r["method"] == method and r["bank_pct"] <= size]
            if not fits:
                continue
            best = max(fits, key=lambda r: (r[choose_on], -r["bank_pct"]))
            out.append({"method": method, "size_limit_pct": size, "config": best["config"],
                        "bank_pct": best["bank_pct"], **{k: best[k] for k in report}})
    return out


def plot_methods(rows: list[dict], labels: dict[str, str], budget_line: float | None, path, key: str = "test_kept",
                 title: str = "") -> None:
    """Kept (``key``) vs bank size: per method the upper envelope of its configs (one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"served": "-o", "full": "-s", "diag": "--s", "lowrank": "-v", "svd": ":^", "share": "-D", "vlora": ":x"}
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["bank_pct"], 100 * r[key]) for r in rows if r["method"] == method)
        env, best = [], -1.0
        for x, y in pts:
            if y > best:
                env.append((x, y))
                best = y
        ax.plot([p[0] for p in env], [p[1] for p in env], styles.get(method, "-"), label=labels.get(method, method))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.35)
    ax.axvline(20, color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(95, color="red", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (% of the 100 adapters)")
    ax.set_ylabel(f"exact match kept (% of the originals, {key.split('_')[0]} paraphrases)")
    ax.set_title(title or (f"served: JD bank + exact adapters over the budget {budget_line}" if budget_line else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
