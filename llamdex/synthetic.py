"""Synthetic tables made from the public schema alone (the paper's ``make_classification_from_json``).

The server never sees tenant data, so the connectors (encoder/decoder) are trained on rows that
only respect the schema: sklearn ``make_classification`` with one informative column per feature,
then each column is mapped into its feature's domain:

* ``int``      -> min-max onto [lo - 0.49, hi + 0.49], rounded (each integer gets a fair share);
* ``float``    -> min-max onto [lo, hi] (rounded to ``decimals`` if given);
* ``category`` -> equal-width bins over the column, one bin per category (or equal-frequency);
* ``bool``     -> above the column mean.

A fraction (default 10%) of every categorical column is then blanked (missing). Labels are
``make_classification``'s classes, i.e. independent of any real distribution (paper §5.2).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from sklearn.datasets import make_classification

from llamdex.schema import FeatureSpec, TenantSchema, load_schema


class SyntheticConfig(BaseModel):
    """Knobs of the generator; defaults follow the paper (10k rows, class_sep 7, 10% missing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_rows: int = Field(default=10_000, ge=1)
    seed: int = 0
    class_sep: float = Field(default=7.0, gt=0)
    flip_y: float = Field(default=0.01, ge=0, le=1)
    cat_missing: float = Field(default=0.1, ge=0, lt=1)
    #: "width": equal-width bins as in the paper (the multimodal columns leave some categories
    #: rare, e.g. ~0.1% of rows); "quantile": equal-frequency bins (every category equally common).
    cat_bins: Literal["width", "quantile"] = "width"


def _minmax(col: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = col.max() - col.min()
    unit = (col - col.min()) / span if span > 0 else np.full_like(col, 0.5)
    return lo + unit * (hi - lo)


def _map_column(f: FeatureSpec, col: np.ndarray, cat_bins: str) -> np.ndarray:
    if f.type == "int":
        ints = np.rint(_minmax(col, f.lo - 0.49, f.hi + 0.49))
        return np.clip(ints, f.lo, f.hi).astype(np.int64)
    if f.type == "float":
        vals = _minmax(col, f.lo, f.hi)
        return np.round(vals, f.decimals) if f.decimals is not None else vals
    if f.type == "bool":
        return col > col.mean()
    assert f.categories is not None
    k = len(f.categories)
    unit = _minmax(col, 0.0, 1.0) if cat_bins == "width" else col.argsort().argsort() / len(col)
    bins = np.minimum((unit * k).astype(np.int64), k - 1)
    return np.array([f.categories[b] for b in bins], dtype=object)


def make_synthetic(schema: TenantSchema | dict | str, config: SyntheticConfig | None = None,
                   **overrides) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows + labels from the schema alone; deterministic for a given config (seed).

    Returns ``(df, y)``: ``df`` has the schema's feature columns in schema order (int64, float64,
    bool, or object holding str/None for categories) and ``y`` holds int64 class indices.
    ``overrides`` are SyntheticConfig fields, e.g. ``make_synthetic(schema, n_rows=500, seed=1)``.
    """
    schema = load_schema(schema)
    cfg = (config or SyntheticConfig()).model_copy(update=overrides)
    cfg = SyntheticConfig.model_validate(cfg.model_dump())  # re-validate overridden fields
    n_feat = len(schema.features)
    n_classes = len(schema.target.classes)
    # make_classification needs n_classes * clusters <= 2 ** n_informative: with very few
    # features add hidden informative columns (dropped below) instead of failing.
    clusters = 2 if n_classes * 2 <= 2 ** n_feat else 1
    n_informative = max(n_feat, math.ceil(math.log2(n_classes * clusters)))
    x, y = make_classification(
        n_samples=cfg.n_rows, n_features=n_informative, n_informative=n_informative, n_redundant=0,
        n_repeated=0, n_classes=n_classes, n_clusters_per_class=clusters, class_sep=cfg.class_sep,
        flip_y=cfg.flip_y, shuffle=True, random_state=cfg.seed,
    )
    df = pd.DataFrame({f.name: _map_column(f, x[:, j], cfg.cat_bins) for j, f in enumerate(schema.features)})
    rng = np.random.default_rng([cfg.seed, 1])
    for f in schema.features:
        if f.type == "category" and cfg.cat_missing > 0:
            blank = rng.random(cfg.n_rows) < cfg.cat_missing
            col = df[f.name].astype(object)
            col[blank] = None
            df[f.name] = col
    return df, y.astype(np.int64)
