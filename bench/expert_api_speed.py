"""How fast the paper's Expert-API baseline writes its queries: shared schema-prompt cache vs padded batches.

:func:`llamdex.expert_api.generate_queries` runs one question at a time on a KV cache of the schema
prompt computed once. The **baseline** is what it replaced: left-padded batches of ``--batch-size``
through ``model.generate`` (greedy, same stop tokens and token limit). Both write replies for the
same first ``--questions`` validation questions of ``--dataset``; the bench reports seconds per
question, the ratio, and how many replies are identical (greedy decoding: they should all be).

    python -m bench.expert_api_speed --dataset bank --questions 16

Writes ``expert_api_speed.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.llamdex_accuracy import ROOT, log


def padded_batches(model, tokenizer, schema, questions: list[str], batch_size: int) -> list[str]:
    """The baseline: left-padded batches through ``model.generate``, greedy."""
    import torch

    from causal_lm import left_pad, stop_token_ids
    from llamdex.expert_api import schema_prompt
    from llamdex.prompting import chat_prompt_ids

    stop = sorted(stop_token_ids(tokenizer))
    prompts = chat_prompt_ids(tokenizer, schema_prompt(schema), questions)
    replies: list[str] = []
    for b in range(0, len(prompts), batch_size):
        ids, mask, _ = left_pad(prompts[b:b + batch_size], stop[0])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12 * len(schema.features) + 16,
                                 do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        replies += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return replies


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.expert_api_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="bank", help="paper dataset whose schema and validation questions to use")
    p.add_argument("--questions", type=int, default=16, help="first N validation questions")
    p.add_argument("--batch-size", type=int, default=16, help="baseline's batch size (the accuracy bench's)")
    p.add_argument("--model", default="smollm2-135m", help="base model (catalog name or HF directory)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="validation-subset seed (as bench.llamdex_accuracy)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    args = p.parse_args(argv)

    import torch

    from bench.common import command_line, write_results
    from cluster.models import load_model, resolve_model
    from llamdex.datasets import load_splits
    from llamdex.evaluation import eval_set
    from llamdex.expert_api import generate_queries

    torch.set_num_threads(args.threads)
    model, tok = load_model(resolve_model(args.model))
    model.eval().requires_grad_(False)
    splits = load_splits(args.dataset, ROOT / "examples" / "datasets")
    schema = splits.schema
    questions = eval_set(splits, "validation", None, 400, seed=args.seed).questions[:args.questions]
    rows, replies = [], {}
    for method, run in (("padded batches (baseline)", lambda: padded_batches(model, tok, schema, questions,
                                                                              args.batch_size)),
                        ("shared prefix (generate_queries)", lambda: generate_queries(model, tok, schema, questions))):
        start = time.perf_counter()
        replies[method] = run()
        seconds = time.perf_counter() - start
        rows.append({"method": method, "questions": len(questions), "seconds": round(seconds, 1),
                     "seconds_per_question": round(seconds / len(questions), 2)})
        log("expert_api_speed.done", **rows[-1])
    base, ours = rows
    same = sum(a == b for a, b in zip(*replies.values(), strict=True))
    for row in rows:  # relative to the baseline; every row carries every column of the table
        row["speedup"] = round(base["seconds"] / row["seconds"], 2)
        row["identical_to_baseline"] = f"{same}/{len(questions)}" if row is ours else "-"
    notes = (f"{args.dataset}: the first {len(questions)} of the accuracy bench's validation questions, greedy, "
             f"{args.threads} torch threads; one run of each, in this order.")
    write_results(Path(args.out), "expert_api_speed", {"rows": rows, "replies": replies}, rows,
                  "Paper Expert-API generation: shared schema-prompt cache vs padded batches",
                  command_line("bench.expert_api_speed", argv), notes)
    print(rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
