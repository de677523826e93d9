"""Encoder ablation: how well each encoder design reads *real* validation questions, on one cache.

The encoder is where Llamdex's accuracy is won or lost (the expert only sees what it reads). This
trains several encoders on the same cached layer-k hidden states of the same synthetic training
questions and scores each on real **validation** rows (20 % of the training side) phrased in the
validation family -- design choices are made on validation; this tool cannot read the test split:

* ``heads``   -- the baseline: regression/classification heads on the hidden states (the design
  before values were copied; :class:`llamdex.encoder.Encoder` with ``copy_literals=False``);
* ``copy``    -- every feature points at a token and copies its value (:mod:`llamdex.literals`);
* ``copy+conv`` -- plus 3 depthwise-convolution blocks (context on both sides of a value);
* ``default`` -- plus the label anchor (the ``ConnectorsConfig`` default).

Per encoder: the non-DP expert's accuracy on the features read (vs on the true features: the
bound; the expert is trained on the rest of the training side), per-feature fidelity and, for
copying encoders, how often the pointer lands on the feature's own value. Writes ``<name>.json`` /
``.md`` to ``--out``.

    python -m bench.llamdex_encoders --dataset bank --epochs 12
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.llamdex_accuracy import ROOT, log, train_or_load_expert

VARIANTS = {
    "heads": {"enc_copy_literals": False, "enc_conv_layers": 0, "enc_anchor": False},
    "copy": {"enc_conv_layers": 0, "enc_anchor": False},
    "copy+conv": {"enc_anchor": False},
    "default": {},
}


def add_validation_ablation_args(p: argparse.ArgumentParser, stem: str, example: str) -> None:
    """The options every validation-split ablation shares (rows, config overrides, threads, seed, caches)."""
    p.add_argument("--rows", type=int, default=300, help="real validation rows (validation family)")
    p.add_argument("--connectors", default="{}", help="JSON of ConnectorsConfig overrides for the shared cache "
                   f"and every variant (e.g. {example})")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="expert and validation-subset seed")
    p.add_argument("--cache", default="~/.cache/atelier/bench/llamdex", help="expert cache (shared with llamdex_accuracy)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    p.add_argument("--name", default=None, help=f"result file stem (default {stem}_<dataset>)")


def load_for_ablation(args: argparse.Namespace):
    """(resolved model, model, tokenizer, dataset splits) for a validation ablation: SmolLM2-135M frozen in
    eval mode at ``args.threads`` torch threads, and ``args.dataset``'s splits."""
    import torch

    from cluster.models import load_model, resolve_model
    from llamdex.datasets import load_splits

    torch.set_num_threads(args.threads)
    resolved = resolve_model("smollm2-135m")
    model, tok = load_model(resolved)
    model.eval().requires_grad_(False)
    return resolved, model, tok, load_splits(args.dataset, ROOT / "examples" / "datasets")


def add_connectors_dir_arg(p: argparse.ArgumentParser) -> None:
    """``--connectors-dir``: evaluate connectors already trained (inference-only ablations)."""
    p.add_argument("--connectors-dir", default=None,
                   help="a trained connectors directory (holding connectors/ and synthetic-expert/, as the accuracy "
                        "bench caches them); default: train or load them as llamdex_accuracy does with --connectors")


def load_bundle(args: argparse.Namespace, resolved, model, tok, splits):
    """The connectors bundle of ``args.connectors_dir``, or trained/loaded through the accuracy bench's cache
    with ``args.connectors``."""
    from bench.llamdex_accuracy import train_or_load_connectors
    from llamdex.connectors_io import load_connectors
    from llamdex.expert import load_expert
    from llamdex.insertion import Bundle
    from llamdex.pipeline import ConnectorsConfig

    if args.connectors_dir:
        d = Path(args.connectors_dir).expanduser()
        encoder, decoder, spec = load_connectors(d / "connectors", resolved.content_hash)
        synthetic, _ = load_expert(d / "synthetic-expert", schema=splits.schema)
        return Bundle(encoder, decoder, synthetic, spec, spec.codec())
    bundle, _ = train_or_load_connectors(Path(args.cache).expanduser(), args.dataset, model, tok, resolved,
                                         splits.schema, ConnectorsConfig(**json.loads(args.connectors)))
    return bundle


def pointer_hits(encoder, raw, value_tokens: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Per feature: [landed on its own value (or 'not stated' when absent), rows]."""
    width = raw.pointer_logits.shape[-1] - 1
    best = raw.pointer_logits.argmax(-1)
    out: dict[str, list[int]] = {}
    for r, row in enumerate(value_tokens):
        for i, f in enumerate(encoder.cfg.features):
            hit = int(best[r, i]) in row[f.name] if f.name in row else int(best[r, i]) == width
            counts = out.setdefault(f.name, [0, 0])
            counts[0] += int(hit)
            counts[1] += 1
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bank", help="titanic, wine, nursery or bank")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--epochs", type=int, default=12, help="encoder epochs for every variant")
    add_validation_ablation_args(p, "llamdex_encoders", "'{\"train_questions\": 1000}'")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from bench.common import command_line, write_results
    from llamdex.evaluation import eval_set
    from llamdex.expert import predict_proba
    from llamdex.pipeline import ConnectorsConfig, cache_prompts, init_connectors, locate_values, prepare_data
    from llamdex.prompting import chat_prompt_ids
    from llamdex.stages import (
        FitSettings,
        PromptExtras,
        encoder_features,
        encoder_run,
        feature_fidelity,
        train_encoder,
    )

    resolved, model, tok, splits = load_for_ablation(args)
    schema, train = splits.schema, splits.fit
    expert, _ = train_or_load_expert(Path(args.cache).expanduser(), args.dataset, schema, train, None, args.seed)
    base = ConnectorsConfig(**{**json.loads(args.connectors), "stage2_questions": 0, "eval_questions": 0})
    data = prepare_data(tok, schema, base)
    start = time.perf_counter()
    cache = cache_prompts(model, tok, data, [base.layer], base)
    log("encoders.cached", prompts=len(data.prompts), seconds=round(time.perf_counter() - start, 1))

    ts = eval_set(splits, "validation", None, args.rows, seed=args.seed)  # as bench.llamdex_accuracy's default
    prompts = chat_prompt_ids(tok, data.answers.system_prompt, ts.questions)
    lits, where, _ = locate_values(tok, schema, prompts, ts.composed)
    val_data = dataclasses.replace(data, prompts=prompts, stage2_rows=[], eval_rows=[])  # hidden states only
    val_cache = cache_prompts(model, tok, val_data, [base.layer], base)
    val_extras = PromptExtras(model.get_input_embeddings(), lits, where)
    bound = float((predict_proba(expert, ts.x).argmax(1) == ts.y).mean())
    truth = torch.from_numpy(ts.x)
    reference = torch.from_numpy(data.codec.encode(train[[f.name for f in schema.features]]))

    rows, details = [], {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        cfg = dataclasses.replace(base, enc_epochs=args.epochs, **VARIANTS[name])
        encoder, _, _ = init_connectors(model, data.codec, data.answers, cfg, model_id=resolved.id,
                                        model_hash=resolved.content_hash)
        start = time.perf_counter()
        settings = FitSettings(cfg.enc_epochs, cfg.enc_lr, cfg.enc_batch, cfg.weight_decay, cfg.warmup_frac, cfg.seed)
        train_encoder(encoder, cache, cfg.layer, data.x_read, data.train_rows, settings, cfg.numeric_weight,
                      progress=lambda r, v=name: log("encoders.epoch", variant=v, epoch=r.epoch, of=r.epochs,
                                                     loss=round(r.loss, 4), seconds=round(r.seconds, 1)),
                      extras=data.extras(model))
        seconds = time.perf_counter() - start
        rows_idx = list(range(len(prompts)))
        read = encoder_features(encoder, val_cache, cfg.layer, rows_idx, extras=val_extras)
        acc = float((predict_proba(expert, read.numpy()).argmax(1) == ts.y).mean())
        fidelity = feature_fidelity(data.codec, read, truth, reference)
        hits = None
        if encoder.copies:
            with torch.no_grad():
                hits = pointer_hits(encoder, encoder_run(encoder, val_cache, cfg.layer, rows_idx, val_extras), where)
        details[name] = {"config": VARIANTS[name], "fidelity": fidelity, "pointer_hits": hits}
        discrete = [m["accuracy"] for m in fidelity.values() if "accuracy" in m]
        rows.append({"encoder": name, "epochs": args.epochs, "train_s": round(seconds), "expert on read %":
                     round(100 * acc, 1), "bound %": round(100 * bound, 1), "gap pts": round(100 * (bound - acc), 1),
                     "pointer on target %": "" if hits is None else
                     round(100 * sum(h for h, _ in hits.values()) / sum(n for _, n in hits.values()), 1),
                     "category/bool acc %": round(100 * float(np.mean(discrete)), 1) if discrete else ""})
        log("encoders.variant", **rows[-1])
    lines = ["Per-feature fidelity on the real validation questions (MAE in raw units / accuracy %; pointer on "
             "target %):",
             "", "| feature | " + " | ".join(details) + " | naive |", "|---|" + "---|" * (len(details) + 1)]
    for feat in schema.features:
        cells = []
        for d in details.values():
            m, h = d["fidelity"][feat.name], (d["pointer_hits"] or {}).get(feat.name)
            val = f"MAE {m['mae']:.3g}" if "mae" in m else f"{100 * m['accuracy']:.1f} %"
            cells.append(val + (f" ({100 * h[0] / h[1]:.0f} %)" if h else ""))
        m = next(iter(details.values()))["fidelity"][feat.name]
        naive = f"MAE {m['mae_baseline']:.3g}" if "mae" in m else f"{100 * m['accuracy_baseline']:.1f} %"
        lines.append(f"| {feat.name} | " + " | ".join(cells) + f" | {naive} |")
    name = args.name or f"llamdex_encoders_{args.dataset}"
    command = command_line("bench.llamdex_encoders", argv)
    notes = (f"{args.dataset}: {len(data.train_rows)} synthetic training questions (cached once, layer {base.layer}), "
             f"{len(prompts)} real validation rows in the validation family; the same non-DP expert (trained on the "
             "rest of the training side) reads each encoder's features; `bound` = that expert on the true "
             "features.\n\n" + "\n".join(lines))
    write_results(Path(args.out), name, {"rows": rows, "details": details, "args": vars(args)}, rows,
                  f"Llamdex encoder ablation ({args.dataset})", command, notes)
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
