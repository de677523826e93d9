"""Synthetic rows come from the schema alone and respect its types, ranges and categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llamdex.codec import FeatureCodec
from llamdex.schema import load_schema
from llamdex.synthetic import SyntheticConfig, make_synthetic

SCHEMAS = Path(__file__).resolve().parents[2] / "examples" / "schemas"


@pytest.mark.parametrize("name", ["titanic", "wine", "nursery", "bank"])
def test_rows_respect_the_schema(name):
    schema = load_schema(SCHEMAS / f"{name}.json")
    df, y = make_synthetic(schema, n_rows=2000, seed=3)
    assert list(df.columns) == [f.name for f in schema.features] and len(df) == len(y) == 2000
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(len(schema.target.classes)))
    for f in schema.features:
        col = df[f.name]
        if f.type == "int":
            assert col.dtype == np.int64 and col.between(f.lo, f.hi).all()
            assert col.min() == f.lo and col.max() == f.hi  # endpoints reachable
        elif f.type == "float":
            assert col.dtype == np.float64 and col.between(f.lo, f.hi).all()
            if f.decimals is not None:
                np.testing.assert_allclose(col, col.round(f.decimals))
        elif f.type == "bool":
            assert col.dtype == bool and 0.2 < col.mean() < 0.8
        else:
            assert set(col.dropna()) <= set(f.categories)
            assert 0.05 < col.isna().mean() < 0.15  # ~10% missing
    x = FeatureCodec(schema).encode(df)  # encodable without error
    assert np.isfinite(x).all()


def test_quantile_bins_make_every_category_equally_common():
    schema = load_schema(SCHEMAS / "bank.json")
    df, _ = make_synthetic(schema, n_rows=3000, seed=0, cat_bins="quantile", cat_missing=0.0)
    counts = df["month"].value_counts()
    assert set(counts.index) == set(schema.feature("month").categories)
    assert counts.max() - counts.min() <= 1


def test_deterministic_by_seed(toy):
    a, ya = make_synthetic(toy, n_rows=300, seed=5)
    b, yb = make_synthetic(toy, n_rows=300, seed=5)
    c, _ = make_synthetic(toy, n_rows=300, seed=6)
    assert a.equals(b) and np.array_equal(ya, yb)
    assert not a.equals(c)


def test_labels_are_learnable_from_the_features(toy):
    """class_sep makes labels a function of the features (what the synthetic expert must learn)."""
    from sklearn.linear_model import LogisticRegression

    df, y = make_synthetic(toy, n_rows=2000, seed=0, cat_missing=0.0)
    x = FeatureCodec(toy).encode(df)
    acc = LogisticRegression(max_iter=500).fit(x[:1500], y[:1500]).score(x[1500:], y[1500:])
    assert acc > 0.75


def test_config_options_and_validation(toy):
    df, _ = make_synthetic(toy, SyntheticConfig(n_rows=500, cat_missing=0.0))
    assert not df["sex"].isna().any()
    with pytest.raises(ValueError, match="cat_missing"):
        make_synthetic(toy, n_rows=10, cat_missing=1.5)


def test_works_with_one_feature_and_many_classes(toy):
    toy["features"] = [toy["features"][0]]
    toy["target"]["classes"] = [{"name": f"c{i}"} for i in range(5)]
    df, y = make_synthetic(toy, n_rows=400, seed=0)
    assert list(df.columns) == ["age"] and set(np.unique(y)) == set(range(5))
