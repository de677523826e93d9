"""Which features the encoder misreads on validation rows, and how sure its pointer was (validation only).

A decision rule on the pointer's mass (a higher "stated" threshold, a margin between the best two
literals) can only repair misreads the pointer was unsure of. This tool reads real **validation** rows
(validation family; it cannot read the test split) through the serving path with one set of
connectors, records for every feature the mass the pointer put on the literal it read (summed over that
literal's tokens) and its "not stated" mass, and reports per feature: the misreads (category/bool: a
different value; numeric: off by more than one unit of the last digit), how many of them the pointer
was *confident* of (mass on the read literal ≥ ``--confident``), how many came back "not stated", and
the largest numeric misreads with their questions (JSON).

    python -m bench.llamdex_misreads --dataset bank --rows 400 \\
        --connectors-dir ~/.cache/atelier/bench/llamdex/connectors/bank-<key>
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.llamdex_encoders import (
    add_connectors_dir_arg,
    add_validation_ablation_args,
    load_bundle,
    load_for_ablation,
)


def literal_mass(encoder, raw):
    """(B, F) mass each feature's pointer put on the literal it reads (all tokens with that literal's kind
    and value), and (B, F) its "not stated" mass."""
    import torch

    probs = torch.softmax(raw.pointer_logits.float(), -1)
    width = raw.literals.kinds.shape[1]
    best = encoder._one_each(raw).clamp(max=width - 1)  # the same choice activate() makes
    kinds, values = raw.literals.kinds, raw.literals.values
    same = (kinds[:, None, :] == kinds.gather(1, best)[..., None]) & (values[:, None, :] == values.gather(1, best)[..., None])
    return (probs[..., :width] * same).sum(-1), probs[..., width]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_misreads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bank", help="titanic, wine, nursery or bank")
    add_connectors_dir_arg(p)
    p.add_argument("--confident", type=float, default=0.9, help="pointer mass on the read literal counted as confident")
    p.add_argument("--show", type=int, default=10, help="largest numeric misreads kept per feature")
    add_validation_ablation_args(p, "llamdex_misreads", "'{\"time_budget_s\": 2400}'")
    args = p.parse_args(argv)

    import torch

    from bench.common import command_line, write_results
    from llamdex.encoder import Encoder
    from llamdex.evaluation import eval_set, llamdex_scores

    resolved, model, tok, splits = load_for_ablation(args)
    bundle = load_bundle(args, resolved, model, tok, splits)
    rows = eval_set(splits, "validation", None, args.rows, seed=args.seed)
    masses, unstated = [], []
    activate = Encoder.activate

    def recording(self, raw):
        mass, none = literal_mass(self, raw)
        masses.append(mass)
        unstated.append(none)
        return activate(self, raw)

    Encoder.activate = recording
    try:
        _, feats, stated = llamdex_scores(model, tok, bundle, rows.questions)
    finally:
        Encoder.activate = activate
    mass, none = torch.cat(masses).numpy(), torch.cat(unstated).numpy()
    assert len(mass) == len(rows.questions), "one activate() call per question batch"
    read, true = bundle.codec.decode(feats), bundle.codec.decode(rows.x)
    table, detail = [], {}
    for i, f in enumerate(splits.schema.features):
        numeric = f.type in ("int", "float")
        tol = 1.0 if f.type == "int" else 10.0 ** -(f.decimals if f.decimals is not None else 3)
        wrong = []
        for r in range(len(rows.questions)):
            t, v = true[r][f.name], read[r][f.name]
            if t is None:
                continue
            if (abs(float(t) - float(v)) > tol) if (numeric and v is not None) else t != v:
                wrong.append({"row": r, "true": t, "read": v, "stated_read": bool(stated[r, i]),
                              "mass_on_read": round(float(mass[r, i]), 3), "not_stated_mass": round(float(none[r, i]), 3),
                              "question": rows.questions[r]})
        confident = [w for w in wrong if w["stated_read"] and w["mass_on_read"] >= args.confident]
        row = {"feature": f.name, "misreads": len(wrong), f"confident (mass ≥ {args.confident})": len(confident),
               "read as not stated": sum(not w["stated_read"] for w in wrong), "rows": len(rows.questions)}
        if numeric:
            err = lambda w: abs(float(w["true"]) - float(w["read"])) if w["read"] is not None else 0.0  # noqa: E731
            wrong.sort(key=err, reverse=True)
            row["MAE of the misreads"] = round(sum(map(err, wrong)) / len(rows.questions), 3)
            row[f"confident among the {args.show} largest"] = sum(
                w["stated_read"] and w["mass_on_read"] >= args.confident for w in wrong[:args.show])
        table.append(row)
        detail[f.name] = wrong[:args.show]
    name = args.name or f"llamdex_misreads_{args.dataset}"
    write_results(Path(args.out), name, {"dataset": args.dataset, "rows": len(rows.questions), "features": table,
                                         "largest": detail, "connectors_dir": args.connectors_dir}, table,
                  f"Misreads on {args.dataset}'s validation rows, and the pointer's confidence",
                  command_line("bench.llamdex_misreads", argv),
                  notes=f"{len(rows.questions)} real validation rows, validation family, one set of connectors. "
                        f"'MAE of the misreads': their absolute errors summed over all rows (the feature's MAE). "
                        f"The largest misreads, with mass and question, are in the JSON ('largest').")
    return table


if __name__ == "__main__":
    main()
