"""Everyday constructs the encoder must read: a hand-written probe, scored for several sets of connectors.

``bench/data/llamdex_probe/<dataset>.jsonl`` holds questions written by hand, each with the values it says
(``{"question", "says": {feature: value}}``): class codes in records ("pclass=1"), ages in words after a
person ("a little girl of four"), kin counts with an article ("a sister"), pronoun narratives. It was
written *while diagnosing* misreads of ``make demo``'s questions, so it is a regression check for those
constructs, not a held-out measure (that is ``bench.llamdex_accuracy --split test``). Every connectors
directory given is scored on the same questions in the same run: per feature, the share read exactly
(a stated feature read as "not stated" counts as a miss), and every miss.

When every question also carries the ``label`` of its row (a class name; the independent sets in
``bench/data/llamdex_independent/`` do), the tenant's non-DP expert trained on the whole training side
(as ``bench.llamdex_accuracy --split test`` trains it, from the same cache) is swapped into each set of
connectors and the run also reports **accuracy**: Llamdex (the served answer) against the same expert
on the features the questions say (the bound), the base LLM alone and the majority class.

    python -m bench.llamdex_probe --dataset titanic \\
        --connectors-dirs old=~/.cache/atelier/bench/llamdex/connectors/titanic-<old> new=~/.cache/.../titanic-<new>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from bench.llamdex_encoders import ROOT, load_for_ablation

if TYPE_CHECKING:
    from llamdex.meaning import MeaningConfig

PROBES = ROOT / "bench" / "data" / "llamdex_probe"


def read_probe(dataset: str, questions: Path | None = None) -> list[dict]:
    """The probe questions of ``dataset``, or of the file ``questions`` in the same format (names the missing
    file and the bad line)."""
    path = questions or PROBES / f"{dataset}.jsonl"
    if not path.is_file():
        raise SystemExit(f"--questions: {path} is missing" if questions else
                         f"--dataset: no probe for {dataset!r} ({path} is missing); fix: one of "
                         f"{sorted(p.stem for p in PROBES.glob('*.jsonl'))}")
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i, q in enumerate(out, 1) if not isinstance(q.get("question"), str) or not isinstance(q.get("says"), dict)]
    if bad:
        raise SystemExit(f"{path}: line {bad[0]} needs {{\"question\": str, \"says\": {{feature: value}}}}")
    return out


def same(read, said) -> bool:
    """Whether a read value equals the value the question says (numbers to 0.01)."""
    if read is None:
        return False
    return read == said if isinstance(said, str) else abs(float(read) - float(said)) < 0.01


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="titanic", help="a dataset with a probe file in bench/data/llamdex_probe/")
    p.add_argument("--questions", type=Path, default=None,
                   help="score this JSONL instead of the dataset's probe (same format: question, says), e.g. a set "
                        "written by someone who never saw the training grammar")
    p.add_argument("--connectors-dirs", nargs="+", required=True,
                   help="trained connectors directories (connectors/ + synthetic-expert/, as the accuracy bench caches "
                        "them), each optionally as label=path")
    p.add_argument("--meaning", choices=("off", "on", "both"), default="both",
                   help="score the connectors without / with the meaning reader (llamdex.meaning: unstated categories "
                        "read from the user's words, as served), or both in the same run")
    p.add_argument("--meaning-config", nargs="+", default=["{}"],
                   help="JSON of llamdex.meaning.MeaningConfig (threshold, margin, over_label, fallback); default: the "
                        "shipped values. Several, each optionally as label=JSON, score each reader in the same run")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--cache", default="~/.cache/atelier/bench/llamdex",
                   help="the accuracy bench's cache (the non-DP expert, when the questions carry labels)")
    p.add_argument("--seed", type=int, default=0, help="expert training seed (as the accuracy bench)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default=None, help="results file stem (default llamdex_probe_<dataset>)")
    args = p.parse_args(argv)
    probes = read_probe(args.dataset, args.questions)
    readers = meaning_configs(args.meaning_config)  # a bad config fails before any model loads

    from bench.common import command_line, write_results
    from bench.llamdex_encoders import load_bundle
    from llamdex.embedding import shared_minilm
    from llamdex.evaluation import llamdex_scores

    resolved, model, tok, splits = load_for_ablation(args)
    names = [f.name for f in splits.schema.features]
    accuracy = labelled_baselines(args, model, tok, splits, probes)
    table, misses = [], {}
    index = {q["question"]: k for k, q in enumerate(probes)}
    variants = {"off": [None], "on": readers, "both": [None, *readers]}[args.meaning]
    for item, reader in ((i, m) for i in args.connectors_dirs for m in variants):
        label, _, d = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        bundle = load_bundle(argparse.Namespace(connectors_dir=d), resolved, model, tok, splits)
        if accuracy is not None:
            bundle = bundle.with_expert(*accuracy["expert"])
        if reader is not None:
            bundle = bundle.with_meaning(shared_minilm(), reader[1])
            label += f" + meaning reader{reader[0]}"
        probs, feats, stated = llamdex_scores(model, tok, bundle, [q["question"] for q in probes])
        read = bundle.codec.decode(feats)
        row = {"connectors": label}
        wrong = []
        for i, name in enumerate(names):
            said = [(k, q["says"][name]) for k, q in enumerate(probes) if name in q["says"]]
            ok = [same(read[k][name] if stated[k, i] else None, v) for k, v in said]
            row[name] = f"{sum(ok)}/{len(ok)}"
            wrong += [{"question": probes[k]["question"], "feature": name, "says": v,
                       "read": read[k][name] if stated[k, i] else "not stated"} for (k, v), good in zip(said, ok, strict=True)
                      if not good]
        total = sum(len(q["says"]) for q in probes)
        row["all features"] = f"{total - len(wrong)}/{total}"
        unsaid = [(k, i) for k, q in enumerate(probes) for i, name in enumerate(names) if name not in q["says"]]
        if unsaid:  # questions that leave features out: a value read for one of those is made up
            made_up = [(k, i) for k, i in unsaid if stated[k, i]]
            row["not said, read anyway"] = f"{len(made_up)}/{len(unsaid)}"
            wrong += [{"question": probes[k]["question"], "feature": names[i], "says": "not stated",
                       "read": read[k][names[i]]} for k, i in made_up]
        for style in dict.fromkeys(q["style"] for q in probes if "style" in q):  # per writing style, when tagged
            said = sum(len(q["says"]) for q in probes if q.get("style") == style)
            missed = sum(probes[index[w["question"]]].get("style") == style for w in wrong if w["says"] != "not stated")
            row[f"features read, {style}"] = f"{said - missed}/{said}"
        if accuracy is not None:
            row["accuracy (Llamdex)"] = round(100 * float((probs.argmax(1) == accuracy["y"]).mean()), 1)
        table.append(row)
        misses[row["connectors"]] = wrong
    if accuracy is not None:
        for row in table:
            row.update({k: v for k, v in accuracy.items() if k not in ("expert", "y")})
            row["gap to the bound"] = round(row["expert on the features said (bound)"] - row["accuracy (Llamdex)"], 1)
    write_results(Path(args.out), args.name or f"llamdex_probe_{args.dataset}",
                  {"dataset": args.dataset, "questions": len(probes), "results": table, "misses": misses}, table,
                  f"Everyday constructs on {args.dataset}: read exactly, per feature (hand-written probe)",
                  command_line("bench.llamdex_probe", argv),
                  notes=(f"{len(probes)} hand-written questions (bench/data/llamdex_probe/{args.dataset}.jsonl), written "
                         "while diagnosing make demo's misreads: a regression check for those constructs, not a held-out "
                         "measure." if args.questions is None else f"{len(probes)} questions of {args.questions.name}.")
                        + " 'not stated' counts as a miss. Every miss is in the JSON ('misses').")
    return table


def meaning_configs(items: list[str]) -> list[tuple[str, MeaningConfig]]:
    """(label suffix, config) per ``--meaning-config`` item (``JSON`` or ``label=JSON``); one unlabelled item gets
    no suffix (the shipped reader), several get their label or their JSON."""
    from llamdex.meaning import MeaningConfig

    out = []
    for item in items:
        label, _, text = item.partition("=") if not item.lstrip().startswith("{") else ("", "", item)
        try:
            config = MeaningConfig(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise SystemExit(f"--meaning-config {item!r}: {exc}; fix: JSON of MeaningConfig fields, e.g. "
                             '\'fallback={"fallback": true}\'') from exc
        out.append((f" ({label or text.strip()})" if len(items) > 1 else "", config))
    return out


def labelled_baselines(args: argparse.Namespace, model, tok, splits, probes: list[dict]) -> dict | None:
    """When every question has a ``label``: the non-DP expert (whole training side, cached like the accuracy
    bench's), the labels, and the baselines' accuracy (%) -- the expert on the features the questions say, the
    base LLM alone on the same questions, the majority class of the training side. None without labels."""
    if not all("label" in q for q in probes):
        return None
    import numpy as np
    import pandas as pd

    from bench.llamdex_accuracy import train_or_load_expert
    from llamdex.codec import FeatureCodec
    from llamdex.evaluation import base_llm_scores
    from llamdex.expert import predict_proba
    from llamdex.prompting import answer_tokens

    schema = splits.schema
    classes = [c.name for c in schema.target.classes]
    unknown = sorted({q["label"] for q in probes} - set(classes))
    if unknown:
        raise SystemExit(f"--questions: label {unknown[0]!r} is not a class of {schema.name}; fix: one of {classes}")
    y = np.array([classes.index(q["label"]) for q in probes])
    train = splits.train  # the whole training side, as the accuracy bench's test runs train the expert (the
    # questions' rows are outside it; this tool reads no split's rows but the training side)
    expert, spec = train_or_load_expert(Path(args.cache).expanduser(), args.dataset, schema, train, None, args.seed)
    said = pd.DataFrame([{f.name: q["says"].get(f.name) for f in schema.features} for q in probes])
    bound = predict_proba(expert, FeatureCodec(schema).encode(said)).argmax(1)
    answers = answer_tokens(tok, classes)
    base = base_llm_scores(model, tok, answers, [q["question"] for q in probes]).argmax(1)
    majority = np.bincount(train[schema.target.name].to_numpy(dtype=np.int64)).argmax()

    def pct(pred) -> float:
        return round(100 * float((np.asarray(pred) == y).mean()), 1)

    return {"expert": (expert, spec), "y": y, "expert on the features said (bound)": pct(bound),
            "base LLM": pct(base), "majority class": pct(np.full(len(y), majority))}


if __name__ == "__main__":
    main()
