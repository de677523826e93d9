"""Decoder ablation: how faithfully the LLM transmits a tenant's expert, on real validation rows.

Stage 2 never sees the encoder (the expert reads true features), so transmission can be measured
apart from reading: several decoders are trained on the same cached synthetic stage-2 prompts, one
per ``dec_sharpen`` temperature (``llamdex.connectors.sharpen``), and each is scored on real
**validation** rows (20 % of the training side, validation phrasing family; this tool cannot read
the test split) with the tenant's non-DP expert fed the rows' *true* features:

* ``agreement %`` -- the LLM's answer equals the expert's argmax (what transmission must preserve);
* ``near-tie agreement %`` -- the same on rows whose expert top-2 margin is below ``--tie-margin``;
* ``accuracy %`` vs ``bound %`` -- the LLM's answer and the expert's argmax against the real label;
* ``ends turn %`` -- the model ends its turn right after its answer (fluency must not regress).

    python -m bench.llamdex_decoders --dataset wine --temperatures 1,0.5,0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.llamdex_accuracy import log, train_or_load_expert
from bench.llamdex_encoders import add_validation_ablation_args, load_for_ablation


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.llamdex_decoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="wine", help="titanic, wine, nursery or bank")
    p.add_argument("--temperatures", default="1,0.5,0.2", help="comma-separated dec_sharpen values (1 = the paper)")
    p.add_argument("--tie-margin", type=float, default=0.1, help="expert top-2 probability margin of a near tie")
    add_validation_ablation_args(p, "llamdex_decoders", "'{\"dec_epochs\": 5}'")
    args = p.parse_args(argv)

    import torch

    from bench.common import command_line, write_results
    from llamdex.evaluation import eval_set
    from llamdex.pipeline import ConnectorsConfig, cache_prompts, init_connectors, prepare_data, residual_rms
    from llamdex.prompting import chat_prompt_ids
    from llamdex.stages import FitSettings, as_distribution, decoder_accuracy, train_decoder

    resolved, model, tok, splits = load_for_ablation(args)
    expert, _ = train_or_load_expert(Path(args.cache).expanduser(), args.dataset, splits.schema, splits.fit, None,
                                     args.seed)
    overrides = json.loads(args.connectors)
    base = ConnectorsConfig(**overrides)
    # only the stage-2 prompts are needed: phrase exactly those, cache their keys/values
    data = prepare_data(tok, splits.schema, dataclasses.replace(base, train_questions=base.stage2_questions,
                                                                 eval_questions=0))
    start = time.perf_counter()
    cache = cache_prompts(model, tok, data, [base.layer], base)
    log("decoders.cached", prompts=len(data.prompts), seconds=round(time.perf_counter() - start, 1))

    ts = eval_set(splits, "validation", None, args.rows, seed=args.seed)
    prompts = chat_prompt_ids(tok, data.answers.system_prompt, ts.questions)
    val_data = dataclasses.replace(data, prompts=prompts, train_rows=[], stage2_rows=[],
                                   eval_rows=list(range(len(prompts))))  # keys/values + answer states
    val_cache = cache_prompts(model, tok, val_data, [base.layer], base)
    truth, y = torch.from_numpy(ts.x), torch.from_numpy(ts.y)
    with torch.no_grad():
        dist = as_distribution(expert(truth).float())
    top2 = dist.topk(2, dim=1).values
    tie = (top2[:, 0] - top2[:, 1]) < args.tie_margin
    rms = residual_rms(cache, base.layer, data.stage2_rows)

    rows, rows_idx = [], list(range(len(prompts)))
    for t in [float(v) for v in args.temperatures.split(",") if v.strip()]:
        cfg = dataclasses.replace(base, dec_sharpen=t)
        _, decoder, _ = init_connectors(model, data.codec, data.answers, cfg, model_id=resolved.id,
                                        model_hash=resolved.content_hash, scale=rms)
        settings = FitSettings(cfg.dec_epochs, cfg.dec_lr, cfg.dec_batch, cfg.weight_decay, cfg.warmup_frac, cfg.seed)
        start = time.perf_counter()
        train_decoder(decoder, model, data.expert, cache, cfg.layer, data.x, data.y, data.stage2_rows, data.answers.ids,
                      settings, lambda r, t=t: log("decoders.epoch", sharpen=t, epoch=r.epoch, of=r.epochs,
                                                   loss=round(r.loss, 4), seconds=round(r.seconds, 1)),
                      None, cfg.dec_objective, cfg.dec_random_share, data.end_of_turn, cfg.dec_end_weight)
        seconds = time.perf_counter() - start
        m = decoder_accuracy(decoder, model, expert, val_cache, cfg.layer, truth, y, rows_idx, data.answers.ids,
                             end_of_turn=data.end_of_turn, per_row=True)
        agree = m.pop("agrees")
        rows.append({"dec_sharpen": t, "train_s": round(seconds), "agreement %": round(100 * m["agreement_with_expert"], 1),
                     f"near-tie agreement % ({int(tie.sum())} rows)":
                         round(100 * float(agree[tie].float().mean()), 1) if tie.any() else "",
                     "accuracy %": round(100 * m["accuracy"], 1), "bound %": round(100 * m["expert_accuracy"], 1),
                     "ends turn %": round(100 * m.get("ends_turn_after_answer", float("nan")), 1)})
        log("decoders.variant", **rows[-1])
    command = command_line("bench.llamdex_decoders", argv)
    notes = (f"{args.dataset}: decoders trained on {len(data.stage2_rows)} cached synthetic stage-2 prompts (layer "
             f"{base.layer}, {base.dec_epochs} epochs, the synthetic expert teacher-forced), scored on {len(prompts)} "
             "real validation rows in the validation family with the tenant's non-DP expert (trained on the rest "
             "of the training side) reading the true features: `bound` = that expert's accuracy; near tie = "
             f"expert top-2 margin < {args.tie_margin}.")
    write_results(Path(args.out), args.name or f"llamdex_decoders_{args.dataset}",
                  {"rows": rows, "args": vars(args)}, rows, f"Llamdex decoder ablation ({args.dataset})", command, notes)
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
