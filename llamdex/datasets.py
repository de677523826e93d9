"""The paper's four real datasets (titanic, wine, nursery, bank), mapped onto their public schemas.

Real data is only ever used to train/evaluate the tenant's expert and to build evaluation
questions; the connectors never see it. Each loader renames raw columns to schema names, maps raw
values to schema categories (e.g. titanic Pclass 1 -> "first", bank "unknown" -> missing), turns
the target into class indices in ``target.classes`` order, and makes a stratified 80/20 split.

**Three splits** (:func:`load_splits`): the 80 % training side is split again, stratified, into
``fit`` (80 %) and ``validation`` (20 %). Every design choice, ablation and default is made on
``validation`` rows with experts trained on ``fit`` only; the ``test`` rows are read by the final
accuracy benchmark alone, with experts trained on the whole training side (``train`` = fit +
validation), as the paper's experts are. :mod:`llamdex.evaluation` enforces who reads what.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from llamdex.codec import FeatureCodec, to_bool
from llamdex.schema import TenantSchema, load_schema

PAPER_DATASETS = ("titanic", "wine", "nursery", "bank")

#: Raw files per dataset with their published SHA-256 (see examples/datasets/README.md).
RAW_FILES: dict[str, dict[str, str]] = {
    "titanic": {"titanic.csv": "7b9054553579934e061e3125097e4e473eabba3ec6b9e1afbc1d1ee684e462bc"},
    "wine": {"winequality-red.csv": "4a402cf041b025d4566d954c3b9ba8635a3a8a01e039005d97d6a710278cf05e",
             "winequality-white.csv": "76c3f809815c17c07212622f776311faeb31e87610d52c26d87d6e361b169836"},
    "nursery": {"nursery.data": "8e0389c3dd37590248a921c2726d869ee96b817761a35eb8416afa24f31f931d"},
    "bank": {"bank-full.csv": "d1513ec63b385506f7cfce9f2c5caa9fe99e7ba4e8c3fa264b3aaf0f849ed32d"},
}

NURSERY_COLUMNS = ["parents", "has_nurs", "form", "children", "housing", "finance", "social", "health", "class"]


def _titanic(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    raw = pd.read_csv(root / "titanic.csv")
    df = pd.DataFrame({
        "pclass": raw["Pclass"].map({1: "first", 2: "second", 3: "third"}),
        "sex": raw["Sex"],
        "age": raw["Age"].astype(float),
        "sibsp": raw["Siblings/Spouses Aboard"].astype(int),
        "parch": raw["Parents/Children Aboard"].astype(int),
        "fare": raw["Fare"].astype(float),
    })
    return df, raw["Survived"].map({0: "no", 1: "yes"})


def _wine(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    parts = []
    for colour in ("red", "white"):
        part = pd.read_csv(root / f"winequality-{colour}.csv", sep=";")
        part.insert(0, "type", colour)
        parts.append(part)
    raw = pd.concat(parts, ignore_index=True)
    raw.columns = [c.lower().replace(" ", "_") for c in raw.columns]
    return raw.drop(columns=["quality"]), raw["quality"].astype(int).astype(str)


def _nursery(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    raw = pd.read_csv(root / "nursery.data", header=None, names=NURSERY_COLUMNS, dtype=str)
    raw = raw[raw["class"] != "recommend"].reset_index(drop=True)  # 2 rows, dropped as in the paper
    return raw.drop(columns=["class"]), raw["class"]


def _bank(root: Path) -> tuple[pd.DataFrame, pd.Series]:
    raw = pd.read_csv(root / "bank-full.csv", sep=";")
    df = raw.drop(columns=["y"])
    for col in ("job", "marital", "education", "contact", "poutcome"):
        df[col] = df[col].astype(object).where(df[col] != "unknown", None)  # "unknown" -> missing
    for col in ("default", "housing", "loan"):
        df[col] = df[col].map({"yes": True, "no": False})
    return df, raw["y"]


_LOADERS = {"titanic": _titanic, "wine": _wine, "nursery": _nursery, "bank": _bank}


def verify_raw_files(name: str, root: str | Path) -> None:
    """Check that the raw files of ``name`` exist under ``root`` with their published SHA-256."""
    root = Path(root)
    for filename, expected in RAW_FILES[name].items():
        path = root / filename
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {path} not found; fix: pass root= the folder holding "
                                    f"{sorted(RAW_FILES[name])} (e.g. examples/datasets)")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise ValueError(f"{name}: {path} has SHA-256 {digest}, expected {expected}; "
                             "fix: restore the original file from /work/shared/datasets")


def normalize_frame(df: pd.DataFrame, schema: TenantSchema) -> pd.DataFrame:
    """Schema columns in schema order with uniform dtypes: int -> int64, float -> float64,
    bool -> bool, category -> object holding str or None (missing)."""
    out = pd.DataFrame(index=df.index)
    for f in schema.features:
        col = df[f.name]
        if f.type == "int":
            out[f.name] = col.astype(np.int64)
        elif f.type == "float":
            out[f.name] = col.astype(np.float64)
        elif f.type == "bool":
            out[f.name] = np.array([to_bool(v, f.name) for v in col], dtype=bool)
        else:
            values = col.astype(object)
            out[f.name] = values.where(values.notna(), None).astype(object)
    return out.reset_index(drop=True)


def load_raw_dataset(name: str, root: str | Path, schema: TenantSchema) -> pd.DataFrame:
    """All rows of a paper dataset as a frame of schema features + the target as class indices."""
    if name not in _LOADERS:
        raise ValueError(f"name: unknown dataset {name!r}; fix: use one of {list(PAPER_DATASETS)}")
    verify_raw_files(name, root)
    features, labels = _LOADERS[name](Path(root))
    features = normalize_frame(features, schema)
    codec = FeatureCodec(schema)
    codec.encode(features)  # raises, naming the feature, if a value does not fit the schema
    out = features.copy()
    out[schema.target.name] = codec.encode_labels(labels.tolist())
    return out


def load_paper_dataset(name: str, root: str | Path, schema: TenantSchema | str | Path | None = None,
                       seed: int = 42, test_size: float = 0.2
                       ) -> tuple[TenantSchema, pd.DataFrame, pd.DataFrame]:
    """Load a paper dataset and split it 80/20, stratified on the target, at a fixed seed.

    ``root`` is the folder with the raw files (``examples/datasets``); the schema defaults to
    ``root/../schemas/<name>.json``. Returns ``(schema, train_df, test_df)``; both frames have the
    schema's feature columns plus the target column holding class indices (int64).
    """
    if name not in _LOADERS:
        raise ValueError(f"name: unknown dataset {name!r}; fix: use one of {list(PAPER_DATASETS)}")
    root = Path(root)
    if schema is None:
        schema = root.parent / "schemas" / f"{name}.json"
    schema = load_schema(schema)
    if schema.name != name:
        raise ValueError(f"schema.name: is {schema.name!r} but dataset {name!r} was requested; "
                         "fix: pass that dataset's schema")
    data = load_raw_dataset(name, root, schema)
    train, test = train_test_split(data, test_size=test_size, random_state=seed,
                                   stratify=data[schema.target.name])
    return schema, train.reset_index(drop=True), test.reset_index(drop=True)


VALIDATION_SHARE = 0.2
"""Share of the training side held out as the validation split (stratified, seeded)."""


@dataclass(frozen=True)
class DatasetSplits:
    """A paper dataset's splits: ``fit`` + ``validation`` = ``train`` (the 80 % side); ``test`` (20 %)."""

    name: str
    schema: TenantSchema
    fit: pd.DataFrame
    validation: pd.DataFrame
    train: pd.DataFrame
    test: pd.DataFrame

    def expert_rows(self, split: str) -> pd.DataFrame:
        """The rows an expert evaluated on ``split`` is trained on: ``fit`` for validation, ``train`` for test."""
        if split not in ("validation", "test"):
            raise ValueError(f"split: {split!r}; fix: use 'validation' or 'test'")
        return self.fit if split == "validation" else self.train


def load_splits(name: str, root: str | Path, schema: TenantSchema | str | Path | None = None, seed: int = 42,
                validation_share: float = VALIDATION_SHARE) -> DatasetSplits:
    """:func:`load_paper_dataset`'s 80/20 split, with the training side split again into fit/validation
    (stratified on the target, same seed); the test rows are exactly the 80/20 split's."""
    schema, train, test = load_paper_dataset(name, root, schema, seed=seed)
    fit, validation = train_test_split(train, test_size=validation_share, random_state=seed,
                                       stratify=train[schema.target.name])
    return DatasetSplits(name, schema, fit.reset_index(drop=True), validation.reset_index(drop=True), train, test)
