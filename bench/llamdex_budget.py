"""Connector training cost vs accuracy: budgeted connectors against the default-config ones.

The connectors job trades time for accuracy through ``--time-budget`` (and the epoch / question
counts of :class:`llamdex.pipeline.ConnectorsConfig`). This scores connectors artifacts — e.g. the
ones ``make demo`` trains with ``train_jobs.connectors --time-budget 600`` — against the
**baseline**: the default-config connectors of :mod:`bench.llamdex_accuracy` (from its cache), on
the same real validation rows in the validation family (a budget is a design choice: it is made on
validation, never on test rows), each with the same non-DP expert (trained on the rest of the
training side) swapped in, next to that expert on the true features (the bound). Training seconds come from each
artifact's own training report.

    python -m bench.llamdex_budget --dataset titanic \\
        --connectors "job, --time-budget 600=demo/connectors/survival"

``--connectors`` takes ``LABEL=REF`` items, REF a registry reference
``tenant/connectors/name[@version]`` (read from ``--store``) or a local connectors directory.
Writes ``llamdex_budget.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.llamdex_accuracy import ROOT, log, train_or_load_connectors, train_or_load_expert


def _materialize(ref: str, store: str, cache: Path) -> Path:
    """A local directory holding ``connectors.json`` for REF (a directory or a registry reference)."""
    path = Path(ref).expanduser()
    if (path / "connectors.json").exists():
        return path
    from cluster.registry import Registry

    parts = ref.split("/")
    if len(parts) != 3 or parts[1] != "connectors":
        raise SystemExit(f"--connectors: {ref!r} is neither a connectors directory nor a reference "
                         "'tenant/connectors/name[@version]'; fix: pass one of those")
    name, _, version = parts[2].partition("@")
    manifest = Registry(store).resolve(parts[0], "connectors", name, int(version) if version else None)
    return Registry(store).materialize(manifest, cache / "materialized")


def score(label: str, bundle, spec, expert, ts, model, tok) -> dict:
    """Accuracy of ``bundle`` with ``expert`` swapped in, plus its training seconds and knobs."""
    from llamdex.evaluation import accuracy, expert_scores, llamdex_scores

    start = time.perf_counter()
    probs, feats, _ = llamdex_scores(model, tok, bundle.with_expert(expert), ts.questions)
    bound = accuracy(expert_scores(expert, ts.x), ts.y)
    acc = accuracy(probs, ts.y)
    report = spec.training.model_dump() if spec.training else {}
    cfg = report.get("config", {})
    return {"connectors": label, "training_s": round(sum(report.get("seconds", {}).values()), 1),
            "time_budget_s": cfg.get("time_budget_s"), "threads": cfg.get("threads"),
            "accuracy": round(100 * acc, 2), "bound": round(100 * bound, 2), "gap_pts": round(100 * (bound - acc), 2),
            "agree_with_expert_on_read": round(float((probs.argmax(1) == expert_scores(expert, feats).argmax(1))
                                                     .mean()), 4),
            "layer": spec.layer, "score_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_budget", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="titanic", help="one of titanic, wine, nursery, bank")
    p.add_argument("--connectors", nargs="+", default=[], metavar="LABEL=REF",
                   help="connectors to compare with the baseline (registry reference or directory)")
    p.add_argument("--store", default=None, help="registry URI for references (default: ATELIER settings)")
    p.add_argument("--model", default="smollm2-135m", help="base model the connectors were trained for")
    p.add_argument("--rows", type=int, default=400, help="validation rows (seeded subset, as bench.llamdex_accuracy)")
    p.add_argument("--seed", type=int, default=0, help="expert seed and test-subset seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--cache", default="~/.cache/atelier/bench/llamdex", help="bench.llamdex_accuracy's cache")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default="llamdex_budget", help="result file stem")
    args = p.parse_args(argv)
    import torch

    from bench.common import command_line, write_results
    from cluster.models import load_model, resolve_model
    from cluster.settings import load_settings
    from llamdex.connectors_io import load_connectors
    from llamdex.datasets import load_splits
    from llamdex.evaluation import eval_set
    from llamdex.insertion import Bundle
    from llamdex.pipeline import ConnectorsConfig

    torch.set_num_threads(args.threads)
    cache = Path(args.cache).expanduser()
    store = args.store or load_settings().store_uri
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved)
    model.eval().requires_grad_(False)
    splits = load_splits(args.dataset, ROOT / "examples" / "datasets")
    schema = splits.schema
    expert, _ = train_or_load_expert(cache, args.dataset, schema, splits.fit, None, args.seed)
    ts = eval_set(splits, "validation", None, args.rows, seed=args.seed)
    rows = []
    baseline, spec = train_or_load_connectors(cache, args.dataset, model, tok, resolved, schema, ConnectorsConfig())
    rows.append(score("default config, no budget (baseline; bench.llamdex_accuracy)", baseline, spec, expert, ts,
                      model, tok))
    log("budget.scored", **rows[-1])
    for item in args.connectors:
        label, sep, ref = item.rpartition("=")
        if not sep:
            raise SystemExit(f"--connectors: {item!r} is not LABEL=REF; fix: e.g. 'job 600 s=demo/connectors/survival'")
        directory = _materialize(ref, store, cache)
        encoder, decoder, spec = load_connectors(directory, resolved.content_hash)
        bundle = Bundle(encoder, decoder, expert, spec, spec.codec())
        rows.append(score(f"{label} ({ref})", bundle, spec, expert, ts, model, tok))
        log("budget.scored", **rows[-1])
    command = command_line("bench.llamdex_budget", argv)
    notes = (f"{args.dataset}: {len(ts.questions)} real validation rows in the validation family, the same non-DP "
             "expert (trained on the rest of the training side) swapped into every set of connectors; `bound` = that "
             "expert on the true features; "
             "`training_s` = the connectors' own training report (synthetic data, hidden-state cache, encoder, "
             "decoder); `threads` = torch threads during training when recorded.")
    write_results(Path(args.out), args.name, {"rows": rows, "args": vars(args)}, rows,
                  "Llamdex connectors: training time vs accuracy", command, notes)
    print((Path(args.out) / f"{args.name}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
