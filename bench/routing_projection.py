"""Can a learned map of the embeddings make ``model="auto"`` read intent? (validation only)

The recommender compares MiniLM embeddings by cosine; a sentence embedder scores topic, not intent.
This experiment learns a linear map ``W`` (384 × 384, started at the identity, pulled back towards it
by ``lam``) on a separate **intent corpus** (``bench/data/routing/intent_corpus/``: 40 other
customizations in domains the benchmark does not use, 14 requests *for* each, 8 near misses *about*
each and 40 everyday requests per file, written by four authors who saw nothing of the router), so
that ``cos(W p, W d)`` ranks a request's own customization first and leaves near misses and everyday
requests below a learned bias (softmax over the tenant's customizations plus "base"). The router then
embeds with ``W`` (:class:`Projected`) and keeps every other part (z-score against everyday requests,
about-not-for, evidence, views).

Two measurements, neither touching a test file:

* **held-out corpus tenants**: ``W`` trained on three corpus files, scored on the fourth by raw cosine
  (best customization if its mean cosine clears the threshold that is best on that file — an oracle
  threshold, the same for both contenders), against the identity (plain MiniLM);
* **the routing benchmark's validation files**, leave one file out: threshold and about-not-for margin
  chosen on the other files (``bench.routing.choose_threshold``), the held-out file scored; against
  plain MiniLM with the same checks.

    python -m bench.routing_projection --threads 1      # → docs/bench/routing_projection.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import command_line, write_results
from bench.routing import (
    DATA,
    MARGIN_GRID,
    ROOT,
    Z_GRID,
    choose_threshold,
    load_profiles,
    load_splits,
    metrics,
    predict,
)
from serve_app.ingress.routing.intent_tuning import CorpusTenant, load_intent_corpus

CORPUS = DATA / "intent_corpus"


def load_corpus(path: Path = CORPUS) -> list[CorpusTenant]:
    """The intent corpus as tenants (:func:`serve_app.ingress.routing.intent_tuning.load_intent_corpus`)."""
    return load_intent_corpus(path)


class Projected:
    """An embedder whose unit vectors are ``W`` times another's, renormalised."""

    def __init__(self, inner, weight: np.ndarray, name: str):
        self.inner, self.weight, self.name = inner, weight.astype(np.float32), name

    def encode(self, texts):
        x = self.inner.encode(list(texts)) @ self.weight.T
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _scores(torch, weight, docs, prompts):
    """(N, C) mean cosine of each prompt to each customization's documents, through ``weight``."""
    unit = torch.nn.functional.normalize
    p = unit(prompts @ weight.T, dim=-1)
    return torch.stack([(p @ unit(d @ weight.T, dim=-1).T).mean(1) for d in docs], 1)


def train_projection(tenants: list[CorpusTenant], embed, lam: float, steps: int, lr: float = 3e-3, seed: int = 0) -> np.ndarray:
    """``W`` minimising the mean per-tenant cross-entropy of (customizations + base) plus ``lam`` ‖W − I‖²."""
    import torch

    torch.manual_seed(seed)
    data = [([torch.tensor(embed(d)) for d in t.documents], torch.tensor(embed([p for p, _ in t.prompts])),
             torch.tensor([len(t.documents) if k < 0 else k for _, k in t.prompts])) for t in tenants]
    dim = data[0][1].shape[1]
    delta = torch.zeros(dim, dim, requires_grad=True)
    log_scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    opt = torch.optim.Adam([delta, log_scale, bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.zeros(())
        for docs, prompts, target in data:
            s = _scores(torch, torch.eye(dim) + delta, docs, prompts)
            logits = torch.cat([s, bias.expand(len(s), 1)], 1) * log_scale.exp()
            loss = loss + torch.nn.functional.cross_entropy(logits, target)
        (loss / len(data) + lam * (delta ** 2).sum()).backward()
        opt.step()
    return (torch.eye(dim) + delta).detach().numpy()


def heldout_tenant(tenant: CorpusTenant, embed, weight: np.ndarray) -> dict:
    """Balanced accuracy on one corpus tenant by raw cosine at its best (oracle) threshold."""
    import torch

    docs = [torch.tensor(embed(d)) for d in tenant.documents]
    s = _scores(torch, torch.tensor(weight), docs, torch.tensor(embed([p for p, _ in tenant.prompts]))).numpy()
    y = np.array([k for _, k in tenant.prompts])
    best = []
    for t in np.arange(0.0, 0.8, 0.01):
        pred = np.where(s.max(1) >= t, s.argmax(1), -1)
        on, off = float((pred[y >= 0] == y[y >= 0]).mean()), float((pred[y < 0] == -1).mean())
        best.append(((on + off) / 2, on, off, round(float(t), 2)))
    bal, on, off, t = max(best)
    return {"balanced": round(bal, 4), "on_topic": round(on, 4), "off_topic_to_base": round(off, 4), "threshold": t}


def loso(recommender, profiles, val: list[dict], tenant: str) -> dict:
    """Leave one validation file out: threshold and margin chosen on the others, the held-out one scored."""
    ids = [p.model_id for p in profiles]
    recommender.warm(profiles)
    scores = [recommender.scores(p["prompt"], profiles) for p in val]
    out = {}
    for held in sorted({p["split"] for p in val}):
        train = [i for i, p in enumerate(val) if p["split"] != held]
        test = [i for i, p in enumerate(val) if p["split"] == held]
        t, m, _ = choose_threshold([scores[i] for i in train], [val[i] for i in train], tenant, ids, Z_GRID, MARGIN_GRID)
        got = metrics([val[i] for i in test], predict([scores[i] for i in test], ids, t, m), tenant, ids)
        out[held] = {"threshold": t, "margin": m, **{k: got[k] for k in ("on_topic_accuracy", "off_topic_to_base",
                                                                          "balanced_accuracy")}}
    out["mean balanced"] = round(float(np.mean([v["balanced_accuracy"] for v in out.values()])), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.routing_projection", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--grid", default="0.001:300,0.01:100,0.1:300", help="lam:steps pairs to train")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="results directory")
    ap.add_argument("--name", default="routing_projection", help="results file stem")
    args = ap.parse_args(argv)
    import torch

    from serve_app.ingress.routing import DEFAULT_THRESHOLDS, Recommender
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder

    torch.set_num_threads(args.threads)
    minilm = CachedEmbedder(MiniLMEmbedder(threads=args.threads))
    tenants = load_corpus()
    tenant, profiles, _ = load_profiles(DATA, 8)
    val, _ = load_splits(DATA)  # the test files are never scored here
    identity = np.eye(minilm.encode(["x"]).shape[1], dtype=np.float32)
    rows, payload = [], {"corpus": {t.name: len(t.prompts) for t in tenants}, "results": []}
    plain_corpus = {t.name: heldout_tenant(t, minilm.encode, identity) for t in tenants}
    gate = DEFAULT_THRESHOLDS["minilm"]  # a starting value only: loso chooses the threshold per fold
    plain_val = loso(Recommender(minilm, gate), profiles, val, tenant)
    payload["results"].append({"contender": "MiniLM (identity)", "corpus": plain_corpus, "validation": plain_val})
    for spec in args.grid.split(","):
        lam, steps = float(spec.split(":")[0]), int(spec.split(":")[1])
        t0 = time.perf_counter()
        corpus = {}
        for i, t in enumerate(tenants):
            weight = train_projection([u for j, u in enumerate(tenants) if j != i], minilm.encode, lam, steps)
            corpus[t.name] = heldout_tenant(t, minilm.encode, weight)
        weight = train_projection(tenants, minilm.encode, lam, steps)
        name = f"projected (lam {lam}, {steps} steps)"
        rec = Recommender(CachedEmbedder(Projected(minilm, weight, name)), gate)
        val_res = loso(rec, profiles, val, tenant)
        payload["results"].append({"contender": name, "corpus": corpus, "validation": val_res,
                                   "distance_from_identity": round(float(np.linalg.norm(weight - identity)), 3)})
        print(json.dumps({"event": "contender", "name": name, "seconds": round(time.perf_counter() - t0, 1),
                          "corpus_mean": round(float(np.mean([v["balanced"] for v in corpus.values()])), 4),
                          "validation_mean": val_res["mean balanced"]}), flush=True)
    for r in payload["results"]:
        row = {"contender": r["contender"],
               "corpus, held-out tenant (mean balanced)": round(float(np.mean([v["balanced"] for v in r["corpus"].values()])), 4),
               "routing validation, held-out file (mean balanced)": r["validation"]["mean balanced"]}
        row |= {f"{k} on / off": f"{v['on_topic_accuracy']} / {v['off_topic_to_base']}"
                for k, v in r["validation"].items() if k != "mean balanced"}
        rows.append(row)
    write_results(args.out, args.name, payload, rows, "Routing: a learned map of the embeddings (validation only)",
                  command_line("bench.routing_projection", argv),
                  notes="Corpus columns: each corpus file held out in turn, raw cosine at that file's best threshold (the "
                        "same oracle for every contender). Validation columns: each validation file held out in turn, "
                        "threshold and about-not-for margin chosen on the others, with every check of the default "
                        "recommender. No test file is read.")
    return payload


if __name__ == "__main__":
    main()
