"""The four paper datasets: example schemas are valid and faithful to the real files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from llamdex.codec import FeatureCodec
from llamdex.datasets import RAW_FILES, load_paper_dataset, verify_raw_files
from llamdex.schema import load_schema

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCHEMAS, DATASETS = EXAMPLES / "schemas", EXAMPLES / "datasets"
PAPER = ("titanic", "wine", "nursery", "bank")
# (m, c, rows after cleaning): m/c as in the paper except bank (see examples/README.md).
EXPECTED = {"titanic": (9, 1, 887), "wine": (13, 11, 6497), "nursery": (27, 4, 12958), "bank": (44, 1, 45211)}


@pytest.fixture
def loaded(paper_datasets):
    return paper_datasets


@pytest.mark.parametrize("name", PAPER)
def test_schema_validates_and_has_expected_sizes(name):
    schema = load_schema(SCHEMAS / f"{name}.json")
    codec = FeatureCodec(schema)
    m, c, _ = EXPECTED[name]
    assert (schema.name, codec.m, codec.output_size) == (name, m, c)
    for f in schema.features:
        assert f.description, f"{name}.{f.name} needs a description (questions use it)"
        words = [f.description, *f.aliases, f.unit or "", *f.unit_aliases, *(w for pair in f.nouns for w in pair)]
        assert not re.search(r"\d", " ".join(words)), \
            f"{name}.{f.name}: digits in labels/units would be confused with values in questions"
        if f.type == "category":  # users' words for every category (issue 16)
            assert all(f.synonyms.get(c) for c in f.categories), f"{name}.{f.name}: synonyms for every category"
        if f.type in ("int", "float", "bool"):
            assert f.default is not None, f"{name}.{f.name}: a default for questions that do not state it"
    assert all(c.synonyms for c in schema.target.classes), f"{name}: synonyms for every class"


@pytest.mark.parametrize("name", PAPER)
def test_real_data_fits_the_schema_and_splits_80_20_stratified(name, loaded):
    schema, train, test = loaded[name]
    _, _, rows = EXPECTED[name]
    assert len(train) + len(test) == rows
    assert abs(len(test) / rows - 0.2) < 0.01
    target = schema.target.name
    for f in schema.features:
        col = train[f.name]
        if f.type in ("int", "float"):
            assert col.between(f.lo, f.hi).all(), f"{name}.{f.name} has values outside {f.range}"
        elif f.type == "category":
            assert set(col.dropna()) <= set(f.categories), f"{name}.{f.name}"
            assert set(col.dropna()) == set(f.categories), f"{name}.{f.name}: a category never occurs"
    x = FeatureCodec(schema).encode(train)
    assert x.shape == (len(train), FeatureCodec(schema).m) and np.isfinite(x).all()
    assert 0.0 <= x.min() and x.max() <= 1.0
    k = len(schema.target.classes)
    train_freq = np.bincount(train[target], minlength=k) / len(train)
    test_freq = np.bincount(test[target], minlength=k) / len(test)
    np.testing.assert_allclose(train_freq, test_freq, atol=0.01)


def test_dataset_specific_mappings(loaded):
    schema, train, _ = loaded["titanic"]
    assert set(train["pclass"]) == {"first", "second", "third"}
    assert train["age"].min() < 1  # infants keep fractional ages (age is a float feature)
    _, wtrain, _ = loaded["wine"]
    assert set(wtrain["quality"]) <= set(range(3, 10)) and set(wtrain["type"]) == {"red", "white"}
    _, ntrain, ntest = loaded["nursery"]
    assert len(ntrain) + len(ntest) == 12960 - 2  # the two 'recommend' rows are dropped
    _, btrain, _ = loaded["bank"]
    assert btrain["job"].isna().any() and "unknown" not in set(btrain["job"].dropna())
    assert btrain["default"].dtype == bool and btrain["pdays"].min() == -1


def test_split_is_deterministic_and_seed_dependent():
    _, a, _ = load_paper_dataset("titanic", DATASETS)
    _, b, _ = load_paper_dataset("titanic", DATASETS)
    _, c, _ = load_paper_dataset("titanic", DATASETS, seed=7)
    assert a.equals(b) and not a.equals(c)


def test_readme_lists_the_sha256_of_every_copied_file():
    readme = (DATASETS / "README.md").read_text()
    for files in RAW_FILES.values():
        for filename, digest in files.items():
            assert hashlib.sha256((DATASETS / filename).read_bytes()).hexdigest() == digest
            assert digest in readme and f"`{filename}`" in readme
    assert "CC BY 4.0" in readme


def test_tampered_or_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="fix: pass root="):
        verify_raw_files("titanic", tmp_path)
    (tmp_path / "titanic.csv").write_text("Survived\n1\n")
    with pytest.raises(ValueError, match="SHA-256"):
        verify_raw_files("titanic", tmp_path)
    with pytest.raises(ValueError, match="name: unknown dataset 'adult'"):
        load_paper_dataset("adult", DATASETS, schema=SCHEMAS / "titanic.json")
