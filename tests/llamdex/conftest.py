"""Shared fixtures for the llamdex science tests (fast, no Ray, no network)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.datasets import load_paper_dataset, load_splits
from llamdex.expert import ExpertArch, build_expert
from llamdex.insertion import Bundle
from llamdex.pipeline import ConnectorsConfig, init_connectors
from llamdex.prompting import answer_tokens

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TOY = {
    "name": "titanic",
    "description": "Passengers of the RMS Titanic",
    "subject": "passenger",
    "features": [
        {"name": "age", "type": "int", "range": [0, 100], "unit": "years", "description": "age of the passenger",
         "aliases": ["aged"]},
        {"name": "fare", "type": "float", "range": [0, 600], "unit": "pounds", "description": "ticket price",
         "decimals": 2},
        {"name": "sex", "type": "category", "categories": ["male", "female"], "description": "sex"},
        {"name": "alone", "type": "bool", "description": "travelling alone"},
    ],
    "target": {"name": "survived", "question": "Did the passenger survive?",
               "classes": [{"name": "no", "description": "did not survive"},
                           {"name": "yes", "description": "survived"}]},
}


@pytest.fixture
def toy() -> dict:
    """A fresh (mutable) copy of the brief's example schema."""
    return copy.deepcopy(TOY)


@pytest.fixture
def one_thread():
    """Tiny MLPs train faster on one thread, especially on a shared 2-core box; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def paper_datasets() -> dict:
    """name -> (schema, train_df, test_df) for the four paper datasets (loaded once per session)."""
    return {name: load_paper_dataset(name, EXAMPLES / "datasets") for name in ("titanic", "wine", "nursery", "bank")}


@pytest.fixture(scope="session")
def paper_splits() -> dict:
    """name -> DatasetSplits (fit / validation / train / test) for the four paper datasets."""
    return {name: load_splits(name, EXAMPLES / "datasets") for name in ("titanic", "wine", "nursery", "bank")}


@pytest.fixture(scope="session")
def lm(tiny_model):
    """(model, tokenizer, ResolvedModel) of the tiny random Llama, loaded once, one intra-op thread."""
    from cluster.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model(tiny_model)
    return model, tok, tiny_model


def make_bundle(lm, schema: dict, layer: int, n: int, seed: int = 0) -> Bundle:
    """Random (untrained) connectors + a random expert: enough for exactness tests."""
    model, tok, resolved = lm
    codec = FeatureCodec(schema)
    cfg = ConnectorsConfig(layer=layer, num_slots=n, enc_width=32, enc_heads=4, enc_head_hidden=16, dec_ffn=16,
                           seed=seed)
    encoder, decoder, spec = init_connectors(model, codec, answer_tokens(tok, codec.class_names), cfg,
                                             model_id=resolved.id, model_hash=resolved.content_hash, scale=0.5)
    expert = build_expert(ExpertArch.from_schema(schema, hidden_sizes=(16,))).eval()
    return Bundle(encoder.eval(), decoder, expert, spec, codec)
