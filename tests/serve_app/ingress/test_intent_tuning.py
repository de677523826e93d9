"""The intent-tuned MiniLM: training moves the embedding the way the corpus says, the shipped adapter loads
through the router's embedder, and a bad adapter directory is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.ingress.routing.embedders import MiniLMEmbedder
from serve_app.ingress.routing.intent_tuning import (
    INTENT_ADAPTER,
    CorpusTenant,
    IntentTuning,
    load_intent_corpus,
    tune_intent,
)


@pytest.fixture(scope="module")
def plain():
    return MiniLMEmbedder(threads=1)


def test_the_corpus_loads_as_labelled_tenants(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"customizations": [
        {"name": "a", "kind": "skill", "description": "d", "examples": ["e"], "on_topic": ["x", "y"], "near_miss": ["z"]}],
        "general": ["g"]}))
    (t,) = load_intent_corpus(tmp_path)
    assert t.documents == [["d", "e"]] and sorted(t.prompts) == [("g", -1), ("x", 0), ("y", 0), ("z", -1)]
    with pytest.raises(FileNotFoundError, match="no intent corpus"):
        load_intent_corpus(tmp_path / "missing")


def test_training_pulls_a_request_towards_its_customization_and_the_adapter_round_trips(tmp_path, plain):
    docs = [["Rewrites a paragraph as a haiku."], ["Estimates a used bicycle's resale price from its brand, age and size."]]
    request, near = "turn this paragraph into a haiku please", "who invented the haiku and when?"
    tenant = CorpusTenant("toy", docs, [(request, 0), (near, -1), ("bike: trek, 4 years, size 56, price?", 1)] * 4)
    model = tune_intent([tenant], IntentTuning(top_layers=1, steps=30, rank=4, lr=5e-3, batch=12))
    model.save_pretrained(tmp_path / "adapter")
    tuned = MiniLMEmbedder(threads=1, adapter=tmp_path / "adapter")
    assert tuned.name.endswith("+adapter")

    def gap(embedder):  # how much nearer the request is to its customization than the near miss is
        d, r, n = embedder.encode([docs[0][0], request, near])
        return float(r @ d - n @ d)

    assert gap(tuned) > gap(plain) + 0.05
    # the lower layers are untouched: a text's embedding changes, but not beyond recognition
    a, b = plain.encode(["an unrelated sentence about the weather"]), tuned.encode(["an unrelated sentence about the weather"])
    assert 0.5 < float((a @ b.T)[0, 0]) < 1.0


def test_a_bad_adapter_directory_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*routing.method"):
        MiniLMEmbedder(threads=1, adapter=tmp_path)
    with pytest.raises(ValueError, match="top_layers"):
        tune_intent([CorpusTenant("t", [["d"]], [("x", 0)])], IntentTuning(top_layers=9))


def test_the_shipped_adapter_is_safetensors_and_says_how_it_was_made(plain):
    files = {p.name for p in INTENT_ADAPTER.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "training.json"}
    made = json.loads((INTENT_ADAPTER / "training.json").read_text())
    corpus = sorted(f.stem for f in (Path(__file__).resolve().parents[3] / "bench" / "data" / "routing"
                                     / "intent_corpus").glob("*.json"))
    assert "bench.routing_intent" in made["command"] and made["corpus"] == corpus  # trained on the whole corpus
    assert "/" not in json.loads((INTENT_ADAPTER / "adapter_config.json").read_text())["base_model_name_or_path"]
    tuned = MiniLMEmbedder(threads=1, adapter=INTENT_ADAPTER)
    v = tuned.encode(["conjugate venir in the futur simple"])
    assert np.isclose(np.linalg.norm(v), 1.0, atol=1e-5) and not np.allclose(v, plain.encode(["conjugate venir in the futur simple"]))
