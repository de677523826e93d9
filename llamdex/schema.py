"""Public tenant schema: the JSON wire format that describes a private table.

A schema is everything the server may know about a tenant's data: feature names, types,
ranges/categories, human descriptions (used to write questions) and the target. Synthetic
rows, questions and the expert's input layout are all derived from it, never from data.

**Vocabulary** (how users write about the table, used to write training questions and to find
values in a question): a feature's ``description`` and ``aliases`` are what users call it;
``synonyms`` are the words they use for its values (``"female": ["woman", "girl", "she"]``,
``"true": ["has a mortgage"]``, ``"-1": ["never contacted before"]``); ``nouns`` are what one unit
of a count is called (``["sibling", "siblings"]``, so "no siblings" and "one sibling" read as
counts); ``unit_aliases`` other ways to write the unit; ``default`` the value the expert gets when a
question does not state the feature; a class's ``synonyms`` the words for an answer.

Validation is strict (unknown keys are refused, so typos fail loudly) and every problem is
reported at once as ``<path>: <what is wrong>; fix: <what to do>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llamdex._validation import format_errors, parse_json_strict, rules_error

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
NAME_FIX = "use 1-64 chars of lowercase letters, digits and '_', starting with a letter (e.g. 'ticket_fare')"
FeatureType = Literal["int", "float", "category", "bool"]


class SchemaError(ValueError):
    """A tenant schema was rejected; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid tenant schema:\n  " + "\n  ".join(self.problems))


def _name_check(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise rules_error([("", f"invalid name {name!r}; fix: {NAME_FIX}")])
    return name


def _strings_check(values: list[str], what: str, min_count: int) -> list[str]:
    """Raise (with per-item paths) unless ``values`` are >= min_count unique, trimmed, non-empty strings."""
    problems = []
    if len(values) < min_count:
        problems.append(("", f"needs at least {min_count} {what} (got {len(values)}); fix: list more {what}"))
    for i, v in enumerate(values):
        if not v.strip() or v != v.strip():
            problems.append((f"[{i}]", f"{what} must be non-empty without surrounding spaces "
                                       f"(got {v!r}); fix: trim or remove it"))
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        problems.append(("", f"duplicate {what} {dupes}; fix: keep each value once"))
    if problems:
        raise rules_error(problems)
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def spelled(text: str) -> str:
    """How a value name or phrase is matched in text: lower case, '_' as a space, single spaces."""
    return " ".join(text.replace("_", " ").lower().split())


class FeatureSpec(_Strict):
    """One input column: its type decides whether ``range`` or ``categories`` is required.

    ``description`` and ``aliases`` should be short noun phrases without digits (questions use
    them as the feature's label); ``unit`` is appended to numbers; ``decimals`` is the precision
    values are written with (floats only). See the module docstring for the vocabulary fields.
    """

    name: str
    type: FeatureType
    description: str = ""
    range: list[Annotated[float, Field(strict=True)]] | None = None
    categories: list[str] | None = None
    unit: str | None = None
    decimals: int | None = Field(default=None, ge=0, le=12)
    aliases: list[str] = Field(default_factory=list)
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    nouns: list[list[str]] = Field(default_factory=list)
    unit_aliases: list[str] = Field(default_factory=list)
    default: Annotated[float, Field(strict=True)] | bool | str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name_check(v)

    @field_validator("range")
    @classmethod
    def _check_range(cls, r: list[float] | None) -> list[float] | None:
        if r is None:
            return r
        if len(r) != 2:
            raise rules_error([("", f"must be [lower, upper] (got {len(r)} values); fix: give exactly two numbers")])
        if not (math.isfinite(r[0]) and math.isfinite(r[1])):
            raise rules_error([("", f"bounds must be finite (got {r}); fix: use finite numbers")])
        if not r[0] < r[1]:
            raise rules_error([("", f"lower bound must be < upper bound (got {_fmt(r)}); "
                                     "fix: write it as [lower, upper] with lower < upper")])
        return r

    @field_validator("categories")
    @classmethod
    def _check_categories(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _strings_check(v, "categories", 2)

    @field_validator("aliases", "unit_aliases")
    @classmethod
    def _check_aliases(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _strings_check(v, str(info.field_name).replace("_", " "), 0)

    @field_validator("nouns")
    @classmethod
    def _check_nouns(cls, v: list[list[str]]) -> list[list[str]]:
        problems = []
        for i, pair in enumerate(v):
            if len(pair) != 2 or any(not w.strip() or w != w.strip() or any(c.isdigit() for c in w) for w in pair):
                problems.append((f"[{i}]", f"must be [singular, plural], two trimmed words without digits (got "
                                           f"{pair!r}); fix: e.g. [\"sibling\", \"siblings\"]"))
        if problems:
            raise rules_error(problems)
        return v

    @model_validator(mode="after")
    def _check_type_rules(self) -> FeatureSpec:
        problems: list[tuple[str, str]] = []
        t = self.type
        if t in ("int", "float"):
            if self.range is None:
                problems.append(("range", f"required for type {t!r}; fix: add \"range\": [lower, upper]"))
            elif t == "int" and any(b != int(b) for b in self.range):
                problems.append(("range", f"int bounds must be whole numbers (got {_fmt(self.range)}); "
                                          "fix: round the bounds or use type 'float'"))
            if self.categories is not None:
                problems.append(("categories", f"not allowed for type {t!r}; fix: remove 'categories'"))
        else:
            for key in ("range", "unit"):
                if getattr(self, key) is not None:
                    problems.append((key, f"not allowed for type {t!r}; fix: remove {key!r}"))
        if t == "category" and self.categories is None:
            problems.append(("categories", "required for type 'category'; fix: add "
                                           "\"categories\": [\"a\", \"b\", ...] (at least 2)"))
        if t == "bool" and self.categories is not None:
            problems.append(("categories", "not allowed for type 'bool' (values are true/false); "
                                           "fix: remove 'categories'"))
        if self.decimals is not None and t != "float":
            problems.append(("decimals", f"only allowed for type 'float' (got type {t!r}); fix: remove 'decimals'"))
        if self.nouns and t != "int":
            problems.append(("nouns", f"only allowed for type 'int' (counts; got type {t!r}); fix: remove 'nouns'"))
        if self.unit_aliases and t not in ("int", "float"):
            problems.append(("unit_aliases", f"not allowed for type {t!r}; fix: remove 'unit_aliases'"))
        if self.unit_aliases and not self.unit:
            problems.append(("unit_aliases", "needs 'unit' (aliases of what?); fix: add \"unit\" or remove "
                                             "'unit_aliases'"))
        problems += self._default_problems() + self._synonym_problems()
        if problems:
            raise rules_error(problems)
        return self

    def value_keys(self) -> list[str]:
        """What ``synonyms`` may be keyed by: the categories, 'false'/'true', or (numeric) any number."""
        return list(self.categories or []) if self.type == "category" else ["false", "true"] if self.type == "bool" else []

    def _default_problems(self) -> list[tuple[str, str]]:
        d, t = self.default, self.type
        if d is None:
            return []
        if t == "category":
            return [("default", "not allowed for type 'category' (an unstated category is 'missing'); "
                                "fix: remove 'default'")]
        if t == "bool":
            return [] if isinstance(d, bool) else [("default", f"must be true or false (got {d!r}); fix: write "
                                                               "true or false")]
        if isinstance(d, (bool, str)) or self.range is None:
            return [] if self.range is None else [("default", f"must be a number (got {d!r}); fix: write a number")]
        if not self.lo <= d <= self.hi or (t == "int" and d != int(d)):
            return [("default", f"{d:g} is not a{' whole' if t == 'int' else ''} number in the range "
                                f"{_fmt(self.range)}; fix: pick a value inside the range")]
        return []

    def _synonym_problems(self) -> list[tuple[str, str]]:
        """Keys must be values of the feature; phrases trimmed, unique and never shared by two values."""
        problems: list[tuple[str, str]] = []
        keys = self.value_keys()
        owner: dict[str, str] = {spelled(k): k for k in keys}
        for key, words in self.synonyms.items():
            where = f"synonyms.{key}"
            if self.type in ("int", "float"):
                try:
                    number = float(key)
                except ValueError:
                    problems.append((where, f"{key!r} is not a number; fix: key numeric synonyms by the value, "
                                            "e.g. \"-1\""))
                    continue
                if self.range is not None and not (self.lo <= number <= self.hi):
                    problems.append((where, f"{key} is outside the range {_fmt(self.range)}; fix: use a value "
                                            "inside the range"))
            elif key not in keys:
                problems.append((where, f"{key!r} is not a value of this feature; fix: use one of {keys}"))
                continue
            for i, w in enumerate(words):
                if not isinstance(w, str) or not w.strip() or w != w.strip():
                    problems.append((f"{where}[{i}]", f"must be a non-empty phrase without surrounding spaces "
                                                      f"(got {w!r}); fix: trim or remove it"))
                    continue
                if self.type in ("int", "float") and not any(c.isalpha() for c in w):
                    problems.append((f"{where}[{i}]", f"{w!r} has no letters (numbers are read as numbers); fix: "
                                                      "remove it"))
                    continue
                other = owner.get(spelled(w))
                if other is not None and other != key:
                    problems.append((f"{where}[{i}]", f"{w!r} already means {other!r} for this feature; fix: a "
                                                      "phrase may stand for one value only, remove one"))
                elif other == key and spelled(w) != spelled(key):
                    problems.append((f"{where}[{i}]", f"{w!r} is listed twice for {key!r}; fix: keep it once"))
                owner.setdefault(spelled(w), key)
        return problems

    def phrases(self) -> dict[str, list[str]]:
        """Every value key -> the phrases that write it (the value's own name first, then synonyms)."""
        out = {k: [k.replace("_", " ")] if self.type == "category" else [] for k in self.value_keys()}
        for key, words in self.synonyms.items():
            out.setdefault(key, []).extend(words)
        return out

    @property
    def lo(self) -> float:
        """Lower range bound (numeric features only)."""
        assert self.range is not None, f"feature {self.name!r} has no range"
        return self.range[0]

    @property
    def hi(self) -> float:
        """Upper range bound (numeric features only)."""
        assert self.range is not None, f"feature {self.name!r} has no range"
        return self.range[1]


class ClassSpec(_Strict):
    """One target class; ``description`` is what the class means in words, ``synonyms`` other
    words for the answer (e.g. 'survived' for 'yes')."""

    name: str
    description: str = ""
    synonyms: list[str] = Field(default_factory=list)

    @field_validator("synonyms")
    @classmethod
    def _check_synonyms(cls, v: list[str]) -> list[str]:
        return _strings_check(v, "synonyms", 0)


class TargetSpec(_Strict):
    """The prediction target: its name, the question asked about it and its classes (in index order)."""

    name: str
    question: str
    classes: list[ClassSpec]

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name_check(v)

    @field_validator("question")
    @classmethod
    def _check_question(cls, v: str) -> str:
        if not v.strip():
            raise rules_error([("", "must not be empty; fix: write the question, e.g. 'Did the passenger survive?'")])
        return v

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, v: list[ClassSpec]) -> list[ClassSpec]:
        try:
            _strings_check([c.name for c in v], "class names", 2)
        except PydanticCustomError as e:
            assert e.context is not None
            raise rules_error([(p + ".name" if p else p, m) for p, m in e.context["problems"]]) from None
        owner: dict[str, str] = {spelled(c.name): c.name for c in v}
        problems = []
        for i, c in enumerate(v):
            for j, w in enumerate(c.synonyms):
                other = owner.setdefault(spelled(w), c.name)
                if other != c.name:
                    problems.append((f"[{i}].synonyms[{j}]", f"{w!r} already means class {other!r}; fix: a word "
                                                             "may stand for one class only, remove one"))
        if problems:
            raise rules_error(problems)
        return v


class TenantSchema(_Strict):
    """A tenant's public table description (see module docstring); features are in input order."""

    name: str
    description: str = ""
    subject: str = "record"
    features: list[FeatureSpec]
    target: TargetSpec

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name_check(v)

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, v: str) -> str:
        if not v.strip():
            raise rules_error([("", "must not be empty; fix: name what one row is, e.g. 'passenger'")])
        return v

    @field_validator("features")
    @classmethod
    def _check_features(cls, v: list[FeatureSpec]) -> list[FeatureSpec]:
        if not v:
            raise rules_error([("", "needs at least 1 feature; fix: describe the input columns")])
        return v

    @model_validator(mode="after")
    def _check_unique_names(self) -> TenantSchema:
        clashes = _name_clashes([f.name for f in self.features], self.target.name)
        if clashes:
            raise rules_error(clashes)
        return self

    def feature(self, name: str) -> FeatureSpec:
        """Return the feature called ``name`` (KeyError naming the known features otherwise)."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; known: {[f.name for f in self.features]}")

    @property
    def class_names(self) -> list[str]:
        """Target class names in index order."""
        return [c.name for c in self.target.classes]

    def canonical_json(self) -> str:
        """Deterministic JSON text (sorted keys, no spaces) used for hashing."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)

    def sha256(self) -> str:
        """SHA-256 of :meth:`canonical_json`: identifies exactly this schema (descriptions included)."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()


def _name_clashes(names: list[Any], target_name: Any) -> list[tuple[str, str]]:
    """Duplicate feature names and a target named like a feature (works on raw or validated input)."""
    seen: dict[str, int] = {}
    problems = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name in seen:
            problems.append((f"features[{i}].name", f"duplicate feature name {name!r} "
                                                    f"(also features[{seen[name]}]); fix: rename one"))
        elif isinstance(name, str):
            seen[name] = i
    if isinstance(target_name, str) and target_name in seen:
        problems.append(("target.name", f"{target_name!r} is also a feature name; "
                                        "fix: rename the target or the feature"))
    return problems


def _raw_name_clashes(data: dict) -> list[str]:
    feats = data.get("features")
    target = data.get("target")
    if not isinstance(feats, list):
        return []
    names = [f.get("name") if isinstance(f, dict) else None for f in feats]
    tname = target.get("name") if isinstance(target, dict) else None
    return [f"{p}: {m}" for p, m in _name_clashes(names, tname)]


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _parse_json(text: str, origin: str) -> Any:
    try:
        return parse_json_strict(text, origin)
    except ValueError as e:
        raise SchemaError([str(e)]) from None


def load_schema(source: TenantSchema | dict | str | Path) -> TenantSchema:
    """Parse and validate a schema from a model, dict, JSON text or a path to a .json file.

    Raises SchemaError listing every problem found (path, what is wrong, how to fix it).
    """
    if isinstance(source, TenantSchema):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        path = Path(source)
        if not path.is_file():
            raise SchemaError([f"<source>: no schema file at {str(path)!r}; fix: pass an existing .json path, "
                               "a JSON string or a dict"])
        data = _parse_json(path.read_text(encoding="utf-8"), str(path))
    elif isinstance(source, str):
        data = _parse_json(source, "<json>")
    else:
        data = source
    if not isinstance(data, dict):
        raise SchemaError([f"<schema>: must be a JSON object (got {type(data).__name__}); "
                           "fix: wrap the schema in {...}"])
    try:
        return TenantSchema.model_validate(data)
    except ValidationError as e:
        # Name clashes are re-checked on the raw input: pydantic skips the model-level check
        # whenever any single feature is invalid, and we want every problem in one message.
        lines = format_errors(e, root="<schema>") + _raw_name_clashes(data)
        raise SchemaError(list(dict.fromkeys(lines))) from None
