"""Choose the meaning reader's thresholds (llamdex.meaning) on validation data.

For each (fallback, margin, over_label) on a grid, the reader runs on the categories an encoder left unstated in
a labelled question set (taken from a ``bench.llamdex_probe`` run *without* the reader: its misses
read "not stated") and on 200 training-grammar questions about validation rows, for the categories
those questions leave out. Three counts per setting: features recovered (read right), wrong fills
(read as another value), and false fills (a value read for a category the question never states:
the reader must leave those "not stated"). No LLM runs here; only the sentence embedder.

    python -m bench.llamdex_meaning --dataset nursery \\
        --questions bench/data/llamdex_independent/nursery_validation.jsonl \\
        --probe docs/bench/llamdex_validation_nursery_everyday.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.llamdex_encoders import ROOT

MARGINS = (0.0, 0.03, 0.05)
OVER_LABEL = (-2.0, 0.0, 0.025, 0.05)  # -2: no label check
FALLBACK = (False, True)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_meaning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="nursery", help="a paper dataset (its schema and validation rows)")
    p.add_argument("--questions", type=Path, required=True, help="labelled questions (JSONL: question, says)")
    p.add_argument("--probe", type=Path, required=True,
                   help="bench.llamdex_probe JSON of the same questions; its first result row must be without the "
                        "meaning reader (its 'not stated' misses are what the reader may fill)")
    p.add_argument("--synthetic", type=int, default=200, help="training-grammar questions for the false-fill count")
    p.add_argument("--threshold", type=float, default=0.3, help="the reader's minimum cosine, fixed on the grid")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default=None, help="results file stem (default llamdex_meaning_<dataset>)")
    args = p.parse_args(argv)

    from bench.common import command_line, write_results
    from llamdex.datasets import load_splits
    from llamdex.embedding import shared_minilm
    from llamdex.meaning import MeaningConfig, MeaningReader
    from llamdex.questions import QuestionGenerator

    splits = load_splits(args.dataset, ROOT / "examples" / "datasets")
    schema = splits.schema
    questions = [json.loads(line) for line in args.questions.read_text().splitlines() if line.strip()]
    probe = json.loads(args.probe.read_text())
    label = probe["results"][0]["connectors"]
    if "meaning" in label:
        raise SystemExit(f"--probe: its first row ({label!r}) already reads by meaning; fix: run the probe with "
                         "--meaning off or both")
    unstated = {(m["question"], m["feature"]) for m in probe["misses"][label] if m["read"] == "not stated"}
    categories = [f.name for f in schema.features if f.type == "category"]
    names = [f.name for f in schema.features]
    rows = splits.validation.sample(n=min(args.synthetic, len(splits.validation)), random_state=1)
    gen = QuestionGenerator(schema, seed=123)
    synthetic = [gen.compose(r) for r in rows[names].to_dict(orient="records")]
    left_out = sum(len(set(categories) - set(q.stated)) for q in synthetic)
    embedder = shared_minilm()
    table = []
    reader = MeaningReader(schema, embedder)  # phrases embedded once; each grid point only swaps the thresholds
    for margin, over_label, fallback in ((m, o, f) for f in FALLBACK for m in MARGINS for o in OVER_LABEL):
        cfg = MeaningConfig(threshold=args.threshold, margin=margin, over_label=over_label, fallback=fallback)
        reader.config = cfg
        right = wrong = 0
        for q in questions:
            skip = [c for c in categories if (q["question"], c) not in unstated]
            for name, read in reader.read(q["question"], skip).items():
                right += str(q["says"][name]) == read.value
                wrong += str(q["says"][name]) != read.value
        false = sum(len(reader.read(q.text, [c for c in categories if c in q.stated])) for q in synthetic)
        table.append({"fallback": fallback, "margin": margin, "over_label": over_label if over_label > -2 else "off",
                      "recovered": f"{right}/{len(unstated)}",
                      "wrong fills": wrong, "recovered − wrong": right - wrong,
                      "false fills": f"{false}/{left_out}", "default": "yes" if cfg == MeaningConfig() else ""})
    write_results(Path(args.out), args.name or f"llamdex_meaning_{args.dataset}",
                  {"dataset": args.dataset, "questions": str(args.questions), "probe_row": label,
                   "unstated": len(unstated), "synthetic_left_out": left_out, "results": table}, table,
                  f"Meaning reader thresholds on {args.dataset} (validation data)",
                  command_line("bench.llamdex_meaning", argv),
                  notes=(f"'recovered': of the {len(unstated)} stated categories the connectors '{label}' read as not "
                         f"stated. 'false fills': of the {left_out} categories {len(synthetic)} training-grammar "
                         "questions about validation rows leave out. Threshold fixed at "
                         f"{args.threshold}."))
    return table


if __name__ == "__main__":
    main()
