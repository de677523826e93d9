"""The routing benchmark's data: splits that share nothing, labels that exist; the script runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.routing import (
    DATA,
    final_test_files,
    load_profiles,
    load_prompts,
    load_splits,
    main,
    validation_files,
)
from serve_app.ingress.routing.background import GENERAL_REQUESTS

ROOT = Path(__file__).resolve().parent.parent


def norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def test_validation_test_examples_and_background_share_no_prompt():
    val, test = load_splits(DATA)
    spec = json.loads((DATA / "customizations.json").read_text())
    examples = {norm(e) for a in spec["adapters"] for e in a.get("examples", [])}
    v, t = {norm(p["prompt"]) for p in val}, {norm(p["prompt"]) for p in test}
    assert len(v) == len(val) and len(t) == len(test), "duplicate prompts inside a split"
    assert not v & t, "validation and test share prompts"
    assert not (v | t) & examples, "a labelled prompt is also an uploaded adapter example"
    assert not (v | t) & {norm(g) for g in GENERAL_REQUESTS}, "a labelled prompt is in the background set"
    assert len({p["id"] for p in val + test}) == len(val) + len(test)


def unlabelled_texts() -> list[str]:
    """The normalised background requests and adapter examples: part of every design set."""
    spec = json.loads((DATA / "customizations.json").read_text())
    return [norm(g) for g in GENERAL_REQUESTS] + [norm(e) for a in spec["adapters"] for e in a.get("examples", [])]


def nearly_repeats(text: str, design: list[str], ratio: float = 0.85) -> str | None:
    """The first of ``design`` (normalised texts) that ``text`` nearly repeats (difflib ratio >= ``ratio`` of
    the normalised text), or None."""
    import difflib

    m = difflib.SequenceMatcher(None, b=norm(text))  # seq2 is cached; seq1 varies
    for d in design:
        m.set_seq1(d)
        if m.real_quick_ratio() >= ratio and m.quick_ratio() >= ratio and m.ratio() >= ratio:
            return d
    return None


def test_no_test_prompt_nearly_repeats_a_design_prompt():
    """The rule the fresh test splits were cleaned with (bench/data/routing/README.md): no test prompt is a
    near-duplicate (difflib ratio >= 0.85 of the normalised text) of a validation prompt, an adapter
    example or a background request -- except key=value records, which share field names, not values."""
    val, test = load_splits(DATA)
    design = [norm(p["prompt"]) for p in val] + unlabelled_texts()
    record = re.compile(r"\w+\s*[=:]\s*[\w.-]+")
    near = [(p["id"], d) for p in test if len(record.findall(p["prompt"])) < 3
            and (d := nearly_repeats(p["prompt"], design)) is not None]
    assert not near, near


def test_no_labelled_prompt_is_a_topic_question_the_method_writes():
    """The about-not-for check's questions are part of the method, written from each customization's
    own words: none of those it writes for the benchmark's customizations is a labelled prompt."""
    from serve_app.ingress.routing import DEFAULT_THRESHOLDS, Recommender
    from serve_app.ingress.routing.embedders import CachedEmbedder, MiniLMEmbedder

    rec = Recommender(CachedEmbedder(MiniLMEmbedder(threads=1)), DEFAULT_THRESHOLDS["minilm"])
    _, profiles, _ = load_profiles(DATA, 8)
    written = {norm(q) for p in profiles for q in rec.topic_questions(p)}
    assert len(written) >= 40 * len(profiles)
    for path in [*validation_files(DATA), *final_test_files(DATA)]:
        hits = [p["prompt"] for p in load_prompts(path) if norm(p["prompt"]) in written]
        assert not hits, (path.name, hits)


def test_labels_name_customizations_and_every_customization_is_covered():
    tenant, profiles, _ = load_profiles(DATA, 0)
    names = {p.model_id.split("/", 1)[1] for p in profiles}
    for path in [*validation_files(DATA), *final_test_files(DATA)]:
        prompts = load_prompts(path)
        labels = {p["label"] for p in prompts}
        assert labels == names | {"base"}, path.name
        assert sum(p["label"] == "base" for p in prompts) >= 50
        assert min(sum(p["label"] == n for p in prompts) for n in names) >= 9, path.name


def test_bench_runs_and_writes_results(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "customizations.json").write_text((DATA / "customizations.json").read_text())
    for path in [*validation_files(DATA), *final_test_files(DATA)]:  # a small slice: every 6th prompt
        lines = path.read_text().splitlines()[::6]
        (data / path.name).write_text("\n".join(lines) + "\n")
    out = main(["--methods", "tfidf", "--data", str(data), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert result["chosen"] == out["chosen"] and {r["contender"] for r in result["results"]} >= {
        "tfidf (old auto: description text, threshold 0.12)"}
    md = (tmp_path / "out" / "routing.md").read_text()
    assert "off-topic → base" in md and (tmp_path / "out" / "routing.png").stat().st_size > 1000
    for r in result["results"]:
        assert 0 <= r["test"]["on_topic_accuracy"] <= 1 and r["latency"]["n"] > 0


def test_the_intent_corpus_shares_nothing_with_the_benchmark():
    """The corpus a router may be trained on (bench/data/routing/intent_corpus/) is other authors' prompts about
    other customizations: none of its prompts or descriptions nearly repeats a labelled prompt, an adapter example
    or a background request (the near-duplicate rule above), and no corpus customization has a benchmark name."""
    from bench.routing_projection import load_corpus

    val, test = load_splits(DATA)
    bench_texts = [norm(p["prompt"]) for p in val + test] + unlabelled_texts()
    tenants = load_corpus()
    assert len(tenants) == 11 and all(len(t.documents) == 10 for t in tenants)
    corpus = [p for t in tenants for p, _ in t.prompts] + [d for t in tenants for ds in t.documents for d in ds]
    near = [(text, d) for text in corpus if (d := nearly_repeats(text, bench_texts)) is not None]
    assert not near, near[:5]
    names = {c["name"] for f in (DATA / "intent_corpus").glob("*.json") for c in json.loads(f.read_text())["customizations"]}
    assert not names & {p.model_id.split("/", 1)[1] for p in load_profiles(DATA, 0)[1]}


def test_the_projection_and_judge_benches_describe_every_customization():
    """bench.routing_projection's embedder returns unit vectors through its map; bench.routing_judge tells the
    judge what every customization does."""
    import numpy as np

    from bench.routing_judge import descriptions
    from bench.routing_projection import Projected

    class Fixed:
        def encode(self, texts):
            return np.ones((len(texts), 3), dtype=np.float32) / np.sqrt(3)

    out = Projected(Fixed(), np.diag([2.0, 0.0, 0.0]), "x").encode(["a", "b"])
    assert np.allclose(out, [[1, 0, 0], [1, 0, 0]])
    tenant, profiles, _ = load_profiles(DATA, 0)
    said = descriptions(DATA, tenant)
    assert set(said) == {p.model_id for p in profiles} and all(len(v) > 5 for v in said.values())


def test_the_previous_default_is_the_rule_shipped_at_that_revision():
    """``--previous-default`` reproduces a recorded revision's rule (3525c1a counted "something else", a bank
    poutcome synonym made of stop words, as a stated value; the current rule does not) and refuses others."""
    import pytest

    from bench.routing import SHIPPED, _WholePhraseEvidence, previous_default
    from serve_app.ingress.routing.evidence import FeatureEvidence

    bank = json.loads((Path(__file__).resolve().parent.parent / "examples" / "schemas" / "bank.json").read_text())
    prompt = "What causes déjà vu? Is it a brain glitch or something else?"
    assert _WholePhraseEvidence(bank).stated(prompt) == ["poutcome"] and FeatureEvidence(bank).stated(prompt) == []
    assert SHIPPED["3525c1a"].min_values == 1 and SHIPPED["6ad0dae"].evidence == "unbound"
    with pytest.raises(SystemExit, match="not recorded"):
        previous_default("abc1234", DATA, 1)
