"""Literal assignment ablation: greedy vs joint, on real validation rows, with the same connectors.

When two features' pointers lean towards the same literal, one of them must read another. The
encoder now takes the jointly most probable assignment (``llamdex.encoder.assign_distinct``, the
Hungarian algorithm on summed log pointer mass); the named baseline is the greedy pass it replaced
(the most confident (feature, literal) pair first). Both read the same questions with the same
connectors in one run, so only the assignment differs. Inference only: training never uses it, so
connectors trained before the change read exactly as retrained ones would. Scored per feature on
real **validation** rows (validation family; this tool cannot read the test split): accuracy for
category/bool features, MAE for numeric ones, each beside its predict-the-mean/majority baseline.

    python -m bench.llamdex_assignment --dataset bank --connectors-dir ~/.cache/atelier/bench/llamdex/connectors/bank-<key>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.llamdex_accuracy import log
from bench.llamdex_encoders import (
    add_connectors_dir_arg,
    add_validation_ablation_args,
    load_bundle,
    load_for_ablation,
)


def greedy_distinct(mass, floor: float = 0.01) -> dict[int, int]:
    """The baseline: (feature, token) pairs above ``floor`` taken by decreasing mass, each feature and
    token once (what the encoder did before the joint assignment)."""
    import torch

    rows, toks = torch.nonzero(mass > floor, as_tuple=True)
    chosen: dict[int, int] = {}
    for k in mass[rows, toks].argsort(descending=True).tolist():
        r, t = int(rows[k]), int(toks[k])
        if r not in chosen and t not in chosen.values():
            chosen[r] = t
    return chosen


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_assignment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bank", help="titanic, wine, nursery or bank")
    add_connectors_dir_arg(p)
    add_validation_ablation_args(p, "llamdex_assignment", "'{\"time_budget_s\": 1500}'")
    args = p.parse_args(argv)

    import numpy as np

    import llamdex.encoder as encoder_module
    from bench.common import command_line, write_results
    from llamdex.evaluation import eval_set, extraction_fidelity, llamdex_scores

    resolved, model, tok, splits = load_for_ablation(args)
    bundle = load_bundle(args, resolved, model, tok, splits)
    rows = eval_set(splits, "validation", None, args.rows, seed=args.seed)
    codec = bundle.codec
    reference = codec.encode(splits.fit[[f.name for f in splits.schema.features]])
    joint = encoder_module.assign_distinct
    scores, feats = {}, {}
    for name, assign in (("greedy", greedy_distinct), ("joint", joint)):
        encoder_module.assign_distinct = assign
        try:
            start = time.perf_counter()
            _, feats[name], _ = llamdex_scores(model, tok, bundle, rows.questions)
        finally:
            encoder_module.assign_distinct = joint
        scores[name] = extraction_fidelity(codec, feats[name], rows.x, reference)
        log("assignment.scored", dataset=args.dataset, assignment=name, seconds=round(time.perf_counter() - start, 1))
    differ = int((np.abs(feats["greedy"] - feats["joint"]) > 1e-6).any(1).sum())
    table = []
    for f in splits.schema.features:
        g, j = scores["greedy"][f.name], scores["joint"][f.name]
        metric = "accuracy" if "accuracy" in g else "mae"
        scale = 100 if metric == "accuracy" else 1
        table.append({"feature": f.name, "metric": "exact %" if metric == "accuracy" else "MAE",
                      "greedy (baseline)": round(g[metric] * scale, 3), "joint": round(j[metric] * scale, 3),
                      "mean/majority": round(g[f"{metric}_baseline"] * scale, 3)})
    name = args.name or f"llamdex_assignment_{args.dataset}"
    write_results(Path(args.out), name, {"dataset": args.dataset, "rows": len(rows.questions), "rows_differ": differ,
                                         "connectors_dir": args.connectors_dir, "scores": scores},
                  table, f"Literal assignment on {args.dataset}: greedy vs joint (validation rows)",
                  command_line("bench.llamdex_assignment", argv),
                  notes=f"{len(rows.questions)} real validation rows, validation family; the same connectors and "
                        f"questions for both; {differ} rows read differently.")
    return table


if __name__ == "__main__":
    main()
