"""Feature encoding: schema rows <-> the expert's [0, 1] input vector (the paper's TableScaler).

Layout (feature order = schema order, one block per feature):

* ``int`` / ``float`` -> 1 column, min-max scaled over the schema range and clipped to [0, 1];
* ``category``        -> K one-hot columns in schema category order; missing -> all zeros;
* ``bool``            -> 1 column, 0.0 / 1.0.

The encoder (LLM hidden states -> features) regresses exactly this vector, and the expert
consumes it, so both sides must agree on it: :attr:`FeatureCodec.columns` names every column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from llamdex.schema import FeatureSpec, TenantSchema, load_schema

_TRUE = {"true", "yes", "1", "y", "t"}
_FALSE = {"false", "no", "0", "n", "f"}


def is_missing(value: Any) -> bool:
    """True for None / NaN / pandas NA (the values that mean 'not known')."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def to_bool(value: Any, feature: str) -> bool:
    """Interpret bools, 0/1 and yes/no/true/false strings; ValueError naming the feature otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{feature}: {value!r} is not a bool; fix: use true/false, yes/no or 0/1")


class FeatureCodec:
    """Encode rows to the expert input matrix (N, m) and decode matrices back to rows."""

    def __init__(self, schema: TenantSchema | dict | str):
        self.schema = load_schema(schema)
        self.features: list[FeatureSpec] = list(self.schema.features)
        self.slices: dict[str, slice] = {}
        self.columns: list[str] = []
        for f in self.features:
            start = len(self.columns)
            if f.type == "category":
                assert f.categories is not None
                self.columns += [f"{f.name}={c}" for c in f.categories]
            else:
                self.columns.append(f.name)
            self.slices[f.name] = slice(start, len(self.columns))
        self.class_names: list[str] = self.schema.class_names
        self._class_index = {c: i for i, c in enumerate(self.class_names)}

    @property
    def m(self) -> int:
        """Expert input size (number of encoded columns)."""
        return len(self.columns)

    @property
    def feature_names(self) -> list[str]:
        """Feature names in encoding order (= schema order)."""
        return [f.name for f in self.features]

    @property
    def num_classes(self) -> int:
        """Number of target classes K."""
        return len(self.class_names)

    @property
    def output_size(self) -> int:
        """Expert output size c: 1 for binary (P(class 1)), K otherwise (the paper's convention)."""
        return 1 if self.num_classes == 2 else self.num_classes

    def encode(self, data: pd.DataFrame | Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> np.ndarray:
        """Rows (DataFrame, list of dicts or one dict) -> float32 array (N, m).

        Every feature column must be present; categoricals may be missing (all-zero block),
        numeric and bool values may not (ValueError naming the feature and the row).
        """
        df = _as_frame(data)
        absent = [f.name for f in self.features if f.name not in df.columns]
        if absent:
            raise ValueError(f"columns {absent} are missing from the data; fix: add them (use NaN/None "
                             "for unknown category values) or check the column names against the schema")
        out = np.zeros((len(df), self.m), dtype=np.float32)
        for f in self.features:
            out[:, self.slices[f.name]] = self._encode_column(f, df[f.name])
        return out

    def _encode_column(self, f: FeatureSpec, col: pd.Series) -> np.ndarray:
        values = col.to_numpy(dtype=object)
        missing = np.asarray(pd.isna(values), dtype=bool)
        if f.type == "category":
            assert f.categories is not None
            index = {c: i for i, c in enumerate(f.categories)}
            block = np.zeros((len(col), len(f.categories)), dtype=np.float32)
            for row in np.flatnonzero(~missing):
                value = values[row]
                code = index.get(value if isinstance(value, str) else str(value))
                if code is None:
                    raise ValueError(f"{f.name}: row {row} has unknown category {value!r}; "
                                     f"fix: use one of {f.categories} (or NaN for unknown)")
                block[row, code] = 1.0
            return block
        if missing.any():
            row = int(np.flatnonzero(missing)[0])
            raise ValueError(f"{f.name}: row {row} is missing ({f.type} features must be present); "
                             "fix: impute the value or drop the row")
        if f.type == "bool":
            return np.array([[to_bool(v, f.name)] for v in values], dtype=np.float32)
        try:
            values = pd.to_numeric(col, errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{f.name}: non-numeric value ({e}); fix: give numbers for a {f.type} feature") from None
        scaled = np.clip((values - f.lo) / (f.hi - f.lo), 0.0, 1.0)
        return scaled.astype(np.float32)[:, None]

    def decode(self, array: np.ndarray) -> list[dict[str, Any]]:
        """(N, m) array -> rows: numeric un-scaled (ints rounded, floats to ``decimals``),
        category = nearest point among the one-hots and 'missing' (argmax if its score > 0.5, else None),
        bool = score >= 0.5."""
        arr = np.asarray(array, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.m:
            raise ValueError(f"array: expected shape (N, {self.m}), got {arr.shape}; fix: pass encoder output "
                             "laid out as FeatureCodec.columns")
        cols: dict[str, list[Any]] = {}
        for f in self.features:
            block = arr[:, self.slices[f.name]]
            if f.type == "category":
                assert f.categories is not None
                best = block.argmax(axis=1)
                cols[f.name] = [f.categories[b] if block[i, b] > 0.5 else None for i, b in enumerate(best)]
            elif f.type == "bool":
                cols[f.name] = [bool(v >= 0.5) for v in block[:, 0]]
            else:
                raw = f.lo + np.clip(block[:, 0], 0.0, 1.0) * (f.hi - f.lo)
                if f.type == "int":
                    cols[f.name] = [int(v) for v in np.rint(raw)]
                else:
                    cols[f.name] = [float(round(v, f.decimals)) if f.decimals is not None else float(v)
                                    for v in raw]
        return [{name: cols[name][i] for name in cols} for i in range(arr.shape[0])]

    def encode_labels(self, labels: Iterable[Any]) -> np.ndarray:
        """Class names -> int64 indices in ``target.classes`` order (ValueError naming a bad label)."""
        out = []
        for row, label in enumerate(labels):
            key = label if isinstance(label, str) else str(label)
            if key not in self._class_index:
                raise ValueError(f"{self.schema.target.name}: row {row} has unknown class {label!r}; "
                                 f"fix: use one of {self.class_names}")
            out.append(self._class_index[key])
        return np.asarray(out, dtype=np.int64)

    def decode_labels(self, indices: Iterable[int]) -> list[str]:
        """Class indices -> class names."""
        return [self.class_names[int(i)] for i in indices]


def _as_frame(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Mapping):
        return pd.DataFrame([dict(data)])
    return pd.DataFrame(list(data))
