"""Routing benchmark: does ``model="auto"`` pick the right customization?

One tenant holds the 12 customizations of ``bench/data/routing/customizations.json`` (4 Llamdex
experts on the example schemas, 8 described adapters). Every contender scores the labelled
prompts of the validation files (``validation*.jsonl``, :func:`validation_files`); each contender's threshold is the one with the best balanced
accuracy on validation (mean of "on-topic prompt → its customization" and "off-topic → base"),
and the contender with the best validated balanced accuracy is *chosen*. Only then is
the test files (``test*.jsonl``) scored, once, for every contender at its validated threshold: accuracy,
per-customization precision/recall, off-topic → base rate and the latency the recommender adds
per request (wall and thread-CPU p50/p99; documents are embedded once, so a request costs one
prompt embedding + dot products). Baselines in the same run: TF-IDF exactly as ``auto`` did
before (description text, fixed threshold 0.12) and TF-IDF over the same documents as the
embedders (threshold validated). The MiniLM contenders include the router's two checks alone and
together (``about-not-for``: questions about a customization's subject, serve_app/ingress/routing/topics.py,
whose margin is chosen jointly with the threshold on validation; ``expert evidence``: an expert needs
one or two features whose value the prompt states, serve_app/ingress/routing/evidence.py; ``first/last
sentence``: a long prompt is also scored by its first and last sentence) and the earlier method without
them. ``--previous-default REV`` adds the router as it shipped at git revision REV (its intent adapter,
its evidence rule, threshold and margin: :data:`SHIPPED`) as a baseline.

    python -m bench.routing                       # all contenders → docs/bench/routing.{json,md,png}
    python -m bench.routing --methods tfidf,minilm --threads 1
    python -m bench.routing --methods tfidf,minilm,minilm-intent --previous-default 3525c1a --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from bench.common import command_line, percentile, write_results
from serve_app.ingress.routing.evidence import FeatureEvidence
from serve_app.ingress.routing.profiles import Profile, adapter_profile, expert_profile
from serve_app.ingress.routing.recommender import BASE, VIEWS_MIN_WORDS, MemoryItem, Recommender, Scores
from serve_app.ingress.routing.tfidf import TfidfRecommender

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "routing"
COSINE_GRID = np.round(np.arange(0.0, 1.0001, 0.005), 3)
Z_GRID = np.round(np.arange(0.0, 8.0001, 0.05), 2)
MARGIN_GRID = np.round(np.arange(-0.4, 0.2001, 0.02), 2)  # about-not-for margin, chosen jointly with the threshold


@dataclass
class Contender:
    name: str
    recommender: object  # Recommender | TfidfRecommender
    profiles: list[Profile]
    fixed_threshold: float | None = None  # baselines that keep an earlier threshold
    fixed_margin: float | None = None  # ... and about-not-for margin
    baseline: bool = False  # never the chosen contender


def load_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _files(data: Path, prefix: str) -> list[Path]:
    files = sorted(data.glob(f"{prefix}*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no {prefix}*.jsonl in {data}")
    return files


def validation_files(data: Path) -> list[Path]:
    """Every ``validation*.jsonl`` in ``data`` (design data: methods, thresholds and margins are chosen
    on all of them); the test files (:func:`final_test_files`) are the only other split."""
    return _files(data, "validation")


def final_test_files(data: Path) -> list[Path]:
    """Every ``test*.jsonl`` in ``data``: the final numbers only (each written before the method it scores
    was chosen; see bench/data/routing/README.md)."""
    return _files(data, "test")


def load_splits(data: Path) -> tuple[list[dict], list[dict]]:
    """(validation prompts, test prompts), each prompt tagged with its file (``split``)."""
    def tagged(files: list[Path]) -> list[dict]:
        return [{**p, "split": f.stem} for f in files for p in load_prompts(f)]

    return tagged(validation_files(data)), tagged(final_test_files(data))


def load_profiles(data: Path, schema_questions: int) -> tuple[str, list[Profile], list[Profile]]:
    """(tenant, semantic profiles, legacy profiles): the legacy ones hold the single text the old
    ``auto`` used (adapter description; expert description + schema description, question, features)."""
    spec = json.loads((data / "customizations.json").read_text())
    tenant, profiles, legacy = spec["tenant"], [], []
    for e in spec["experts"]:
        schema = json.loads((ROOT / "examples" / "schemas" / f"{e['schema']}.json").read_text())
        model_id = f"{tenant}/{e['name']}"
        description = e.get("description", schema.get("description", ""))
        profiles.append(expert_profile(model_id, description, schema, schema_questions))
        old = [description, schema.get("description", ""), schema["target"]["question"]]
        old += [f"{f['name'].replace('_', ' ')} {f.get('description', '')}" for f in schema["features"]]
        legacy.append(Profile(model_id, "expert", (" ".join(p for p in old if p),), ("legacy",)))
    for a in spec["adapters"]:
        model_id = f"{tenant}/{a['name']}"
        profiles.append(adapter_profile(model_id, a["description"], a.get("examples", [])))
        legacy.append(Profile(model_id, "adapter", (a["description"],), ("legacy",)))
    return tenant, profiles, legacy


def score_matrix(c: Contender, prompts: list[dict]) -> list[Scores]:
    """The recommender's scores and checks for every prompt (documents embedded once)."""
    c.recommender.warm(c.profiles)
    return [c.recommender.scores(p["prompt"], c.profiles) for p in prompts]


def predict(scores: list[Scores], ids: list[str], threshold: float, margin: float | None = None) -> list[str]:
    """The best-ranked customization where it passes the gate and both checks, else base (what
    ``Recommender.recommend`` decides without feedback, by the same :meth:`Scores.passes`)."""
    out = []
    for s in scores:
        best = int(s.rank.argmax())
        out.append(ids[best] if s.passes(best, threshold, margin) else BASE)
    return out


def metrics(prompts: list[dict], predicted: list[str], tenant: str, ids: list[str]) -> dict:
    truth = [BASE if p["label"] == BASE else f"{tenant}/{p['label']}" for p in prompts]
    on = [(t, y) for t, y in zip(truth, predicted, strict=True) if t != BASE]
    off = [(t, y) for t, y in zip(truth, predicted, strict=True) if t == BASE]
    acc_on = sum(t == y for t, y in on) / max(len(on), 1)
    acc_off = sum(y == BASE for _, y in off) / max(len(off), 1)
    per = {}
    for m in [*ids, BASE]:
        tp = sum(t == m and y == m for t, y in zip(truth, predicted, strict=True))
        n_pred = sum(y == m for y in predicted)
        n_true = sum(t == m for t in truth)
        per[m] = {"precision": round(tp / n_pred, 3) if n_pred else None,
                  "recall": round(tp / n_true, 3) if n_true else None, "n": n_true}
    errors = [{"id": p["id"], "prompt": p["prompt"], "label": t, "predicted": y}
              for p, t, y in zip(prompts, truth, predicted, strict=True) if t != y]
    return {"on_topic_accuracy": round(acc_on, 4), "off_topic_to_base": round(acc_off, 4),
            "balanced_accuracy": round((acc_on + acc_off) / 2, 4),
            "overall_accuracy": round(sum(t == y for t, y in zip(truth, predicted, strict=True)) / len(truth), 4),
            "n_on_topic": len(on), "n_off_topic": len(off), "per_customization": per, "errors": errors}


def choose_threshold(scores: list[Scores], prompts: list[dict], tenant: str, ids: list[str],
                     grid: np.ndarray, margins: np.ndarray | None = None) -> tuple[float, float | None, list]:
    """The threshold (and about-not-for margin, when ``margins``) with the best validated balanced
    accuracy: the middle of the best plateau. The curve is the threshold sweep at the chosen margin."""
    table = {}
    for margin in ([None] if margins is None else [float(x) for x in margins]):
        for t in grid:
            m = metrics(prompts, predict(scores, ids, float(t), margin), tenant, ids)
            table[(float(t), margin)] = (m["on_topic_accuracy"], m["off_topic_to_base"], m["balanced_accuracy"])
    top = max(v[2] for v in table.values())
    plateau = [k for k, v in table.items() if v[2] == top]
    best_margins = sorted({m for _, m in plateau if m is not None}) or [None]
    margin = best_margins[len(best_margins) // 2]
    at = sorted(t for t, m in plateau if m == margin)
    threshold = at[len(at) // 2]
    curve = [(t, *table[(float(t), margin)]) for t in map(float, grid)]
    return threshold, margin, curve


def configure(c: Contender, threshold: float, margin: float | None) -> None:
    """Set the contender's recommender to its validated threshold and margin."""
    c.recommender.threshold = threshold
    if isinstance(c.recommender, Recommender) and c.recommender.topic_margin is not None:
        c.recommender.topic_margin = margin


def latency(c: Contender, prompts: list[dict], threshold: float, margin: float | None = None) -> dict:
    """Per-request time of ``recommend`` (documents already embedded): wall and this thread's CPU."""
    configure(c, threshold, margin)
    c.recommender.warm(c.profiles)
    c.recommender.recommend(prompts[0]["prompt"], c.profiles)  # first call pays lazy inits
    wall, cpu = [], []
    for p in prompts:
        w, t = time.perf_counter(), time.thread_time()
        c.recommender.recommend(p["prompt"], c.profiles)
        cpu.append((time.thread_time() - t) * 1000)
        wall.append((time.perf_counter() - w) * 1000)
    return {"wall_p50_ms": round(percentile(wall, 50), 2), "wall_p99_ms": round(percentile(wall, 99), 2),
            "cpu_p50_ms": round(percentile(cpu, 50), 2), "cpu_p99_ms": round(percentile(cpu, 99), 2), "n": len(wall)}


def feedback_effect(c: Contender, threshold: float, margin: float | None, val: list[dict], test: list[dict],
                    tenant: str, ids: list[str]) -> dict:
    """Test accuracy after the tenant corrects every validation prompt the chosen method got
    wrong (POST /v1/feedback with the right customization, as nearest-neighbour memory)."""
    rec: Recommender = c.recommender
    configure(c, threshold, margin)
    wrong = []
    for p in val:
        truth = BASE if p["label"] == BASE else f"{tenant}/{p['label']}"
        if rec.recommend(p["prompt"], c.profiles).chosen != truth:
            wrong.append(MemoryItem(p["prompt"], truth, 1))
    predicted = [rec.recommend(p["prompt"], c.profiles, wrong).chosen for p in test]
    m = metrics(test, predicted, tenant, ids)
    return {"corrections": len(wrong), "test_on_topic_accuracy": m["on_topic_accuracy"],
            "test_off_topic_to_base": m["off_topic_to_base"], "test_balanced_accuracy": m["balanced_accuracy"]}


def issue_scenario(c: Contender, threshold: float, margin: float | None = None) -> list[dict]:
    """The issue's three prompts for tenant demo (survival, nursery, style) — the old auto got 1 of 3."""
    schemas = {n: json.loads((ROOT / "examples" / "schemas" / f"{n}.json").read_text()) for n in ("titanic", "nursery")}
    profiles = [expert_profile("demo/survival", schemas["titanic"]["description"], schemas["titanic"]),
                expert_profile("demo/nursery", schemas["nursery"]["description"], schemas["nursery"]),
                adapter_profile("demo/style", "writes in a pirate voice for ship stories")]
    configure(c, threshold, margin)
    cases = [("A 30 year old man in third class paid 8 pounds. Did he survive the Titanic sinking?", "demo/survival"),
             ("Write me a pirate story about ships", "demo/style"),
             ("Our family has two children and critical housing; how would the nursery school rank our "
              "application?", "demo/nursery")]
    return [{"prompt": p, "expected": e, "chosen": c.recommender.recommend(p, profiles).chosen} for p, e in cases]


def build_contenders(methods: list[str], data: Path, threads: int) -> tuple[str, list[Contender]]:
    from serve_app.ingress.routing.embedders import BaseLMEmbedder, CachedEmbedder, MiniLMEmbedder

    out: list[Contender] = []
    tenant, plain_docs, legacy = load_profiles(data, 0)
    _, with_q, _ = load_profiles(data, 8)
    if "tfidf" in methods:
        out.append(Contender("tfidf (old auto: description text, threshold 0.12)", TfidfRecommender(0.12), legacy, 0.12,
                             baseline=True))
        out.append(Contender("tfidf (same documents, validated threshold)", TfidfRecommender(), with_q, baseline=True))
    embedders = {}
    if "minilm" in methods:
        embedders["minilm"] = CachedEmbedder(MiniLMEmbedder(threads=threads))
    if "minilm-intent" in methods:
        from serve_app.ingress.routing.intent_tuning import INTENT_ADAPTER

        embedders["minilm-intent"] = CachedEmbedder(MiniLMEmbedder(threads=threads, adapter=INTENT_ADAPTER))
    if "smollm2" in methods:
        embedders["smollm2-mid"] = CachedEmbedder(BaseLMEmbedder("smollm2-135m", threads=threads))
    plain = {"topic_margin": None, "require_evidence": False, "views_min_words": None}
    for name, emb in embedders.items():
        for pooling in ("mean", "max") if name != "minilm-intent" else ("mean",):
            for normalize in (True, False) if name != "minilm-intent" else (True,):
                label = f"{name} {pooling}, {'z-score' if normalize else 'cosine'}"
                out.append(Contender(label, Recommender(emb, 0.5, pooling, normalize, **plain), with_q))
        if name != "minilm-intent":
            out.append(Contender(f"{name} mean, z-score, no schema questions",
                                 Recommender(emb, 0.5, "mean", True, **plain), plain_docs))
        variants = (  # (label, about-not-for, expert evidence: features needed or 0, views)
            ("expert evidence ≥ 1", False, 1, False), ("about-not-for", True, 0, False),
            ("about-not-for + expert evidence ≥ 1", True, 1, False),
            ("about-not-for + expert evidence ≥ 2", True, 2, False),
            ("about-not-for + expert evidence ≥ 2 + first/last sentence", True, 2, True))
        for label, about, values, views in variants:
            rec = Recommender(emb, 0.5, "mean", True, topic_margin=0.0 if about else None,
                              require_evidence=values > 0, min_values=max(values, 1),
                              views_min_words=VIEWS_MIN_WORDS if views else None)
            out.append(Contender(f"{name} mean, z-score + {label}", rec, with_q))
    return tenant, out


@dataclasses.dataclass(frozen=True)
class ShippedRule:
    """How ``auto`` decided at one revision, besides its intent adapter (read from git)."""

    evidence: str  # "unbound": every in-range number counts; "bound, whole-phrase stop words": numbers bound to a
    #                feature, a value phrase not counted only when the *whole* phrase is a stop word ("something else"
    #                counted); the current rule is neither
    min_values: int
    threshold: float
    margin: float


SHIPPED = {  # serve_app/ingress/routing/{__init__,evidence}.py at each revision
    "6ad0dae": ShippedRule("unbound", 2, 3.6, -0.14),
    "3525c1a": ShippedRule("bound, whole-phrase stop words", 1, 3.6, -0.2),
}


class _WholePhraseEvidence(FeatureEvidence):
    """Evidence as of 3525c1a: a value phrase is skipped only when the whole phrase is one stop word."""

    @staticmethod
    def says_something(phrase: str) -> bool:
        text = phrase.strip().lower()
        return len(text) > 2 and text not in ENGLISH_STOP_WORDS


def previous_default(rev: str, data: Path, threads: int) -> Contender:
    """The router as it shipped at git revision ``rev`` (one of :data:`SHIPPED`): its intent adapter read
    from git, its evidence rule, its number of stated values, its threshold and margin."""
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder

    rule = next((r for known, r in SHIPPED.items() if rev.startswith(known) or known.startswith(rev)), None)
    if rule is None or len(rev) < 7:
        raise SystemExit(f"--previous-default {rev}: its routing rule is not recorded; fix: one of {sorted(SHIPPED)} "
                         "(add a revision to bench.routing.SHIPPED)")
    folder = "serve_app/ingress/routing/intent_minilm"
    adapter = Path(tempfile.mkdtemp(prefix="previous-intent-"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        blob = subprocess.run(["git", "show", f"{rev}:{folder}/{name}"], cwd=ROOT, capture_output=True, check=False)
        if blob.returncode:
            raise SystemExit(f"--previous-default {rev}: {folder}/{name} is not in that revision "
                             f"({blob.stderr.decode().strip()}); give a commit that shipped the intent adapter")
        (adapter / name).write_bytes(blob.stdout)
    _, profiles, _ = load_profiles(data, 8)
    old = ((lambda schema: FeatureEvidence(schema, bound=False)) if rule.evidence == "unbound"
           else _WholePhraseEvidence)
    profiles = [dataclasses.replace(p, evidence=old(p.evidence.schema)) if p.evidence is not None else p
                for p in profiles]
    rec = Recommender(CachedEmbedder(MiniLMEmbedder(threads=threads, adapter=adapter)), rule.threshold, "mean", True,
                      topic_margin=rule.margin, min_values=rule.min_values, views_min_words=None)
    return Contender(f"the default shipped at {rev} (its intent adapter, {rule.evidence} evidence ≥ {rule.min_values} "
                     f"value{'s' if rule.min_values > 1 else ''}, {rule.threshold} / {rule.margin})", rec, profiles,
                     fixed_threshold=rule.threshold, fixed_margin=rule.margin, baseline=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="customizations.json, validation*.jsonl, test*.jsonl")
    ap.add_argument("--methods", default="tfidf,minilm,minilm-intent,smollm2",
                    help="comma list of tfidf, minilm, minilm-intent (MiniLM with the shipped intent adapter), smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the embedders")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="where routing.{json,md,png} go")
    ap.add_argument("--name", default="routing", help="results file stem")
    ap.add_argument("--previous-default", metavar="REV",
                    help="also score the router as shipped at this git revision (a baseline; see previous_default)")
    ap.add_argument("--validation-only", action="store_true",
                    help="score validation only (while developing a method: the test split stays unseen)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    val, test = load_splits(args.data)
    tenant, contenders = build_contenders(args.methods.split(","), args.data, args.threads)
    if args.previous_default:
        contenders.append(previous_default(args.previous_default, args.data, args.threads))
    ids = [p.model_id for p in contenders[0].profiles]
    results, curves = [], {}
    for c in contenders:  # 1) validation: threshold per contender
        t0 = time.perf_counter()
        scores = score_matrix(c, val)
        margin = None
        if c.fixed_threshold is None:
            grid = Z_GRID if getattr(c.recommender, "normalize", False) else COSINE_GRID
            margins = MARGIN_GRID if getattr(c.recommender, "topic_margin", None) is not None else None
            threshold, margin, curves[c.name] = choose_threshold(scores, val, tenant, ids, grid, margins)
        else:
            threshold, margin = c.fixed_threshold, c.fixed_margin
        m = metrics(val, predict(scores, ids, threshold, margin), tenant, ids)
        results.append({"contender": c.name, "threshold": threshold, "topic_margin": margin, "validation": m})
        print(json.dumps({"event": "validation", "contender": c.name, "threshold": threshold, "topic_margin": margin,
                          "balanced": m["balanced_accuracy"], "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    if args.validation_only:
        table = [{"contender": r["contender"], "threshold": r["threshold"], "topic margin": r["topic_margin"],
                  "val on-topic": r["validation"]["on_topic_accuracy"],
                  "val off-topic → base": r["validation"]["off_topic_to_base"],
                  "val balanced": r["validation"]["balanced_accuracy"]} for r in results]
        write_results(args.out, args.name, {"results": results, "validation_curves": curves}, table,
                      "Routing (validation only)", command_line("bench.routing", argv))
        return {"results": results}
    chosen = max((r for r, c in zip(results, contenders, strict=True) if not c.baseline),
                 key=lambda r: r["validation"]["balanced_accuracy"], default=results[0])
    for c, r in zip(contenders, results, strict=True):  # 2) test, once, at the validated threshold
        predicted = predict(score_matrix(c, test), ids, r["threshold"], r["topic_margin"])
        r["test"] = metrics(test, predicted, tenant, ids)
        r["test_by_file"] = {}
        for name in sorted({p["split"] for p in test}):
            keep = [i for i, p in enumerate(test) if p["split"] == name]
            m = metrics([test[i] for i in keep], [predicted[i] for i in keep], tenant, ids)
            r["test_by_file"][name] = {k: m[k] for k in ("on_topic_accuracy", "off_topic_to_base", "balanced_accuracy",
                                                         "n_on_topic", "n_off_topic")}
        r["latency"] = latency(c, test, r["threshold"], r["topic_margin"])
        r["chosen"] = r is chosen
    best = contenders[results.index(chosen)]
    chosen["issue_scenario"] = issue_scenario(best, chosen["threshold"], chosen["topic_margin"])
    if isinstance(best.recommender, Recommender):
        chosen["feedback"] = feedback_effect(best, chosen["threshold"], chosen["topic_margin"], val, test, tenant, ids)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    table = [{"contender": ("**" + r["contender"] + "** (chosen)") if r["chosen"] else r["contender"],
              "threshold": r["threshold"] if r["topic_margin"] is None else f"{r['threshold']} / {r['topic_margin']}",
              "val balanced": r["validation"]["balanced_accuracy"],
              "test on-topic → right": r["test"]["on_topic_accuracy"],
              "test off-topic → base": r["test"]["off_topic_to_base"],
              "added p50 / p99 ms (wall)": f"{r['latency']['wall_p50_ms']} / {r['latency']['wall_p99_ms']}",
              "CPU p50 ms": r["latency"]["cpu_p50_ms"]} for r in results]
    by_file = [f"{name}: on-topic {m['on_topic_accuracy']}, off-topic → base {m['off_topic_to_base']} "
               f"({m['n_on_topic']} + {m['n_off_topic']} prompts)" for name, m in chosen["test_by_file"].items()]
    per = chosen["test"]["per_customization"]
    notes = ["Thresholds (z-score / about-not-for margin where the contender has that check) and the chosen "
             "contender come from validation only; test was scored once.",
             f"Load average during the run: {' '.join(load)} (2 cores shared with other jobs; wall latency is noisy, "
             "thread CPU time is the work done).", "",
             "Test files, chosen contender: " + "; ".join(by_file) + ".", "",
             f"## Chosen: {chosen['contender']} at threshold {chosen['threshold']} — per customization (test)", "",
             "| customization | precision | recall | n |", "|---|---|---|---|"]
    notes += [f"| {m} | {v['precision']} | {v['recall']} | {v['n']} |" for m, v in per.items()]
    notes += ["", "## The issue's example (tenant demo: survival, nursery, style)", "",
              "| prompt | expected | chosen |", "|---|---|---|"]
    notes += [f"| {s['prompt']} | {s['expected']} | {s['chosen']} |" for s in chosen["issue_scenario"]]
    if "feedback" in chosen:
        f = chosen["feedback"]
        notes += ["", "## Learning from feedback", "",
                  f"After the tenant corrects the {f['corrections']} validation prompts the chosen method got wrong "
                  f"(POST /v1/feedback), test: on-topic {f['test_on_topic_accuracy']}, off-topic → base "
                  f"{f['test_off_topic_to_base']} (before: {chosen['test']['on_topic_accuracy']}, "
                  f"{chosen['test']['off_topic_to_base']})."]
    notes += ["", "## Test errors of the chosen contender", "", "| id | prompt | label | routed to |", "|---|---|---|---|"]
    notes += [f"| {e['id']} | {e['prompt'][:90].replace(chr(10), ' ').replace('|', '/')} | {e['label']} | "
              f"{e['predicted']} |" for e in chosen["test"]["errors"]]
    payload = {"tenant": tenant, "customizations": ids, "n_validation": len(val), "n_test": len(test),
               "loadavg": load, "chosen": chosen["contender"], "results": results, "validation_curves": curves}
    write_results(args.out, args.name, payload, table, "Routing: model=\"auto\" recommender", command_line(
        "bench.routing", argv), "\n".join(notes))
    _plot(curves, args.out / f"{args.name}.png")
    print(json.dumps({"event": "done", "chosen": chosen["contender"], "threshold": chosen["threshold"],
                      "test": {k: chosen["test"][k] for k in ("on_topic_accuracy", "off_topic_to_base")},
                      "latency": chosen["latency"]}), flush=True)
    return payload


def _plot(curves: dict, path: Path) -> None:
    """Validation: on-topic accuracy and off-topic → base rate against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = {n: c for n, c in curves.items() if "centroid" not in n and "top2" not in n}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in keep.items():
        t = [c[0] for c in curve]
        line, = ax.plot(t, [c[1] for c in curve], label=f"{name}: on-topic → right", lw=1.2)
        ax.plot(t, [c[2] for c in curve], ls="--", color=line.get_color(), lw=1.2, label=f"{name}: off-topic → base")
    ax.set_xlabel("similarity threshold")
    ax.set_ylabel("rate (validation)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
