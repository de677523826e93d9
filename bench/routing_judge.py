"""Can the pool's own LM judge intent for ``model="auto"``? (validation only)

For every validation prompt the default recommender picks its best-ranked customization; the pool's
base model (SmolLM2-135M-Instruct) is then asked, in its chat template, whether the request is a task
for that customization ("Is this request a task for this assistant?", the adapter's description or the
expert schema's first sentence and target question), and P(yes) is read from the next-token logits
(yes/no tokens, both cases). The judge is useful if P(yes) separates prompts whose best candidate is
right from those whose best candidate is wrong (off-topic, or another customization) better than the
recommender's own z-score: ROC AUC of both, overall and inside the uncertain band |z - threshold| < 1.5,
plus the judge's time per prompt. No test file is read.

    python -m bench.routing_judge --threads 1      # → docs/bench/routing_judge.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, write_results
from bench.routing import BASE, DATA, ROOT, load_profiles, load_splits

QUESTION = "Is this request a task for this assistant?"
SYSTEM = "You decide whether a specialised assistant should handle a user's request. Answer only Yes or No."


def descriptions(data: Path, tenant: str) -> dict[str, str]:
    """What the judge is told each customization does: an adapter's description; an expert's schema
    description (first sentence) and target question."""
    spec = json.loads((data / "customizations.json").read_text())
    out = {f"{tenant}/{a['name']}": a["description"] for a in spec["adapters"]}
    for e in spec["experts"]:
        schema = json.loads((ROOT / "examples" / "schemas" / f"{e['schema']}.json").read_text())
        out[f"{tenant}/{e['name']}"] = schema["description"].split(". ")[0] + ". It answers: " + schema["target"]["question"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.routing_judge", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--max-chars", type=int, default=1200, help="prompt characters shown to the judge")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="results directory")
    ap.add_argument("--name", default="routing_judge", help="results file stem")
    args = ap.parse_args(argv)
    import torch
    from sklearn.metrics import roc_auc_score

    from cluster.models import load_model, resolve_model
    from serve_app.ingress.routing import DEFAULT_THRESHOLDS, Recommender
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder

    torch.set_num_threads(args.threads)
    tenant, profiles, _ = load_profiles(DATA, 8)
    ids = [p.model_id for p in profiles]
    said = descriptions(DATA, tenant)
    val, _ = load_splits(DATA)
    threshold = DEFAULT_THRESHOLDS["minilm"]
    rec = Recommender(CachedEmbedder(MiniLMEmbedder(threads=args.threads)), threshold)
    rec.warm(profiles)
    model, tok = load_model(resolve_model("smollm2-135m"))
    model.eval()
    yes = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes", " yes", " Yes")})
    no = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("no", "No", " no", " No")})
    rows, seconds = [], []
    for p in val:
        s = rec.scores(p["prompt"], profiles)
        best = int(s.rank.argmax())
        truth = BASE if p["label"] == BASE else f"{tenant}/{p['label']}"
        chat = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Assistant: {said[ids[best]]}\n\nRequest: {p['prompt'][:args.max_chars]}\n\n{QUESTION}"}]
        t0 = time.perf_counter()
        tokens = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).logits[0, -1].float(), -1)
        p_yes = float(torch.sigmoid(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)))
        seconds.append(time.perf_counter() - t0)
        rows.append({"id": p["id"], "z": float(s.gate[best]), "judge_p_yes": p_yes, "candidate_right": ids[best] == truth})
    right = np.array([r["candidate_right"] for r in rows])
    judge, z = np.array([r["judge_p_yes"] for r in rows]), np.array([r["z"] for r in rows])
    band = np.abs(z - threshold) < 1.5
    table = [{"score": name, "AUC, all validation prompts": round(float(roc_auc_score(right, v)), 3),
              f"AUC, uncertain band ({int(band.sum())} prompts)": round(float(roc_auc_score(right[band], v[band])), 3)}
             for name, v in (("recommender z-score", z), ("LM judge P(yes)", judge))]
    ms = round(1000 * float(np.median(seconds)), 1)
    write_results(args.out, args.name, {"rows": rows, "judge_ms_p50": ms, "table": table}, table,
                  "Routing: the pool's own LM as an intent judge (validation only)", command_line("bench.routing_judge", argv),
                  notes=f"{len(rows)} validation prompts; 'right' = the recommender's best-ranked candidate is the labelled "
                        f"one ({int(right.sum())} prompts); judge time per prompt p50 {ms} ms (one forward of the chat "
                        f"prompt). No test file is read.")
    return {"table": table, "judge_ms_p50": ms}


if __name__ == "__main__":
    main()
