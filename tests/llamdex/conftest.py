"""Shared fixtures for the llamdex science tests (fast, no Ray, no network)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llamdex.datasets import load_paper_dataset

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
