"""Phrasing families as data: a JSON file of question templates that renders for any schema.

A *family* is a set of ways to write a question about one row, independent of any dataset: four
styles (narrative, record, terse, conversational), each with document frames, clause templates
per kind of feature, phrases for a feature whose value is unknown, question wrappers, plus shared
asides (irrelevant sentences). :class:`FamilyRenderer` fills them with a schema's labels and a
row's values written by :class:`llamdex.render.ValueWriter` (digits, words, units, synonyms).

Two families live in files of this format, both disjoint from the training grammar (tested):

* ``validation_family.json`` — the *validation* family: every design choice is made on it, with
  real validation rows (:mod:`llamdex.evaluation`);
* ``heldout_family.json`` — the *test* family, written by someone who never saw the training
  grammar (from ``docs/heldout-family-spec.md`` only); read only by the final accuracy benchmark,
  on test rows.

The format (placeholders, counts, rules) is documented in ``docs/heldout-family-spec.md``;
:func:`load_family` validates a file strictly and names every problem.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamdex._validation import format_errors, parse_json_strict, rules_error
from llamdex.codec import is_missing
from llamdex.render import (
    LABEL,
    Question,
    ValueWriter,
    article,
    cap,
    lower_first,
    mark,
    sentence_case,
    unmark,
)
from llamdex.schema import FeatureSpec, TenantSchema, load_schema

FORMAT = "llamdex.phrasing_family"
STYLES = ("narrative", "record", "terse", "conversational")
SHORT_STYLES = frozenset({"record", "terse"})  # single-letter synonyms and abbreviated keys allowed
FAMILY_DIR = Path(__file__).resolve().parent
FAMILY_FILES = {"validation": FAMILY_DIR / "validation_family.json", "test": FAMILY_DIR / "heldout_family.json"}

_LABELS = {"label", "Label", "key"}
ALLOWED: dict[str, set[str]] = {
    "documents": {"opening", "fields", "aside", "question"},
    "openings": {"subject", "a_subject", "Subject"},
    "numeric": _LABELS | {"value"},
    "count": _LABELS | {"count", "noun"},
    "category": _LABELS | {"value"},
    "bool": _LABELS | {"answer", "phrase"},
    "unstated": _LABELS,
    "questions": {"question", "question_lc"},
    "asides": {"subject", "a_subject", "Subject", "number"},
}
MINIMUM = {"documents": 3, "openings": 2, "numeric": 4, "count": 3, "category": 4, "bool": 3, "unstated": 2,
           "questions": 3, "joiners": 1}


class FamilyError(ValueError):
    """A phrasing family file was rejected; ``problems`` holds one 'where: what; fix: how' line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid phrasing family:\n  " + "\n  ".join(self.problems))


def placeholders(template: str) -> list[str]:
    """The ``{name}`` placeholders of a template, in order (KeyError-free: uses string.Formatter)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _check_pool(section: str, items: list[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if len(items) < MINIMUM.get(section, 1):
        problems.append(("", f"needs at least {MINIMUM.get(section, 1)} entries (got {len(items)}); fix: write more"))
    seen: set[str] = set()
    for i, t in enumerate(items):
        try:
            names = placeholders(t)
        except ValueError as e:
            problems.append((f"[{i}]", f"bad braces in {t!r} ({e}); fix: write placeholders as {{name}}, "
                                       "and no other braces"))
            continue
        bad = [n for n in names if n not in ALLOWED[section]]
        if bad:
            problems.append((f"[{i}]", f"unknown placeholder(s) {bad} in {t!r}; fix: use only "
                                       f"{sorted(ALLOWED[section])}"))
        if section != "asides" and re.search(r"\d", t):
            problems.append((f"[{i}]", f"digits in {t!r} (numbers are values); fix: write them in words or "
                                       "leave them out"))
        if t in seen:
            problems.append((f"[{i}]", f"{t!r} is listed twice; fix: keep it once"))
        seen.add(t)
        problems += [(f"[{i}]", msg) for msg in _required(section, t, names)]
    return problems


def _required(section: str, t: str, names: list[str]) -> list[str]:
    need = {"documents": [{"fields"}, {"question"}], "numeric": [{"value"}, _LABELS],
            "category": [{"value"}, _LABELS], "count": [{"count"}, {"noun"}],
            "bool": [{"answer", "phrase"}], "unstated": [_LABELS], "questions": [{"question", "question_lc"}]}
    out = [f"{t!r} needs one of {sorted(group)}; fix: add it" for group in need.get(section, []) if not group & set(names)]
    if section == "bool" and "answer" in names and not _LABELS & set(names):
        out.append(f"{t!r} writes a bare yes/no without naming the feature; fix: add {{label}} or {{key}}")
    once = {"documents": ("fields", "question", "opening", "aside")}.get(section, ("value", "count", "noun",
                                                                                     "answer", "phrase"))
    out += [f"{t!r} uses {{{n}}} more than once; fix: use it once" for n in once if names.count(n) > 1]
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Clauses(_Strict):
    """Clause templates per kind of feature (see the spec for the placeholders of each)."""

    numeric: list[str]
    count: list[str]
    category: list[str]
    bool: list[str]

    @model_validator(mode="after")
    def _check(self) -> Clauses:
        problems = [(f"{k}{p}", m) for k in ("numeric", "count", "category", "bool")
                    for p, m in _check_pool(k, getattr(self, k))]
        if problems:
            raise rules_error(problems)
        return self


class Style(_Strict):
    """One writing style: document frames, openings, clause joiners, clauses, unknown-value phrases, wrappers."""

    documents: list[str]
    openings: list[str]
    joiners: list[str]
    last_joiners: list[str] = Field(default_factory=list)
    clauses: Clauses
    unstated: list[str]
    questions: list[str]

    @model_validator(mode="after")
    def _check(self) -> Style:
        problems = [(f"{k}{p}", m) for k in ("documents", "openings", "unstated", "questions")
                    for p, m in _check_pool(k, getattr(self, k))]
        if not self.joiners:
            problems.append(("joiners", "needs at least 1 joiner; fix: e.g. \", \""))
        problems += [(f"{k}[{i}]", f"{j!r} has digits or braces; fix: use punctuation and words only")
                     for k in ("joiners", "last_joiners") for i, j in enumerate(getattr(self, k))
                     if re.search(r"[\d{}]", j)]
        if problems:
            raise rules_error(problems)
        return self


class Family(_Strict):
    """A phrasing family file (see the module docstring and the spec)."""

    format: Literal["llamdex.phrasing_family"]
    version: Literal[1]
    name: str = Field(min_length=1)
    notes: str = ""
    styles: dict[Literal["narrative", "record", "terse", "conversational"], Style]
    asides: list[str]

    @field_validator("styles")
    @classmethod
    def _all_styles(cls, v: dict) -> dict:
        missing = [s for s in STYLES if s not in v]
        if missing:
            raise rules_error([("", f"missing style(s) {missing}; fix: write all of {list(STYLES)}")])
        return v

    @field_validator("asides")
    @classmethod
    def _check_asides(cls, v: list[str]) -> list[str]:
        problems = _check_pool("asides", v)
        if len(v) < 8:
            problems.append(("", f"needs at least 8 asides (got {len(v)}); fix: write more"))
        if problems:
            raise rules_error(problems)
        return v

    def templates(self) -> list[str]:
        """Every template of the family (all sections, all styles)."""
        out = list(self.asides)
        for st in self.styles.values():
            out += st.documents + st.openings + st.unstated + st.questions
            out += st.clauses.numeric + st.clauses.count + st.clauses.category + st.clauses.bool
        return out

    def clause_templates(self) -> list[str]:
        """Clause templates only (numeric, count, category, bool, unstated) of every style."""
        out = []
        for st in self.styles.values():
            c = st.clauses
            out += c.numeric + c.count + c.category + c.bool + st.unstated
        return out


def load_family(source: str | Path | dict) -> Family:
    """Parse and validate a family (path, JSON text or dict); FamilyError lists every problem."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            if not path.is_file():
                raise FamilyError([f"<source>: no family file at {str(path)!r}; fix: pass an existing .json path"])
            text, origin = path.read_text(encoding="utf-8"), str(path)
        else:
            text, origin = str(source), "<json>"
        try:
            data = parse_json_strict(text, origin)
        except ValueError as e:
            raise FamilyError([str(e)]) from None
    try:
        return Family.model_validate(data)
    except ValidationError as e:
        raise FamilyError(format_errors(e, root="<family>")) from None


def family_file(split: str) -> Family:
    """The family of ``split`` ('validation' or 'test'), validated."""
    if split not in FAMILY_FILES:
        raise ValueError(f"split: {split!r}; fix: use one of {sorted(FAMILY_FILES)}")
    return load_family(FAMILY_FILES[split])


def feature_kind(f: FeatureSpec) -> str:
    """Which clause pool a feature's templates come from (counts may also use 'numeric')."""
    return {"int": "count" if f.nouns else "numeric", "float": "numeric", "category": "category",
            "bool": "bool"}[f.type]


class FamilyRenderer:
    """Writes questions about rows of one schema in one family; deterministic for a seed and call order.

    Per question: a style, then per feature a clause from that style (a count may also use a numeric
    clause; a missing value uses an ``unstated`` phrase or is left out), clauses in random order
    joined by one of the style's joiners, then a document frame with an opening, an aside and the
    target question in one of the style's wrappers.
    """

    def __init__(self, schema: TenantSchema | dict | str, family: Family | str | Path, seed: int = 0):
        self.schema = load_schema(schema)
        self.family = family if isinstance(family, Family) else load_family(family)
        self.rng = random.Random(seed)
        self.writer = ValueWriter(self.rng)

    def compose(self, row: Mapping[str, Any]) -> Question:
        """One question about ``row`` (every schema feature present; None/NaN = unknown)."""
        rng, fam = self.rng, self.family
        name = rng.choice(STYLES)
        style = fam.styles[name]  # type: ignore[index]
        clauses, stated = {}, set()
        for i, f in enumerate(self.schema.features):
            if f.name not in row:
                raise ValueError(f"row: feature {f.name!r} is absent; fix: include it (None/NaN if unknown)")
            if is_missing(row[f.name]):
                if rng.random() < 0.5:
                    clauses[f.name] = self._fill(rng.choice(style.unstated), i, f, None, name)
                continue
            clauses[f.name] = self._clause(i, f, row[f.name], style, name)
            stated.add(f.name)
        order = list(clauses.values())
        rng.shuffle(order)
        joiner = rng.choice(style.joiners)
        if len(order) > 1 and style.last_joiners and rng.random() < 0.5:
            fields = joiner.join(order[:-1]) + rng.choice(style.last_joiners) + order[-1]
        else:
            fields = joiner.join(order)
        subject = self.schema.subject
        subj = {"subject": subject, "a_subject": article(subject), "Subject": cap(subject)}
        q = self.schema.target.question.strip()
        question = rng.choice(style.questions).format(question=q, question_lc=lower_first(q))
        doc = rng.choice(style.documents).format(
            opening=rng.choice(style.openings).format(**subj), fields=fields, question=question,
            aside=rng.choice(fam.asides).format(number=rng.choice(range(2, 60)), **subj))
        doc = re.sub(r"[ \t]{2,}", " ", doc).strip()
        text, spans, label_spans = unmark(sentence_case(doc))
        names = [f.name for f in self.schema.features]
        return Question(text=text, family=fam.name, clauses={k: unmark(c)[0] for k, c in clauses.items()},
                        spans={names[i]: s for i, s in spans.items()},
                        label_spans={names[i]: s for i, s in label_spans.items()}, stated=frozenset(stated))

    def make_many(self, rows) -> list[str]:
        """One question text per row (DataFrame rows or dicts)."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict(orient="records")
        return [self.compose(r).text for r in rows]

    def _clause(self, i: int, f: FeatureSpec, value: Any, style: Style, name: str) -> str:
        rng, pools = self.rng, style.clauses
        kind = feature_kind(f)
        if kind == "count" and rng.random() < 0.5:
            kind = "numeric"
        if kind == "bool":
            phrase = self.writer.phrase(f, value)
            usable = [t for t in pools.bool if "phrase" not in placeholders(t) or phrase is not None]
            return self._fill(rng.choice(usable), i, f, value, name, phrase=phrase)
        return self._fill(rng.choice(getattr(pools, kind)), i, f, value, name)

    def _fill(self, template: str, i: int, f: FeatureSpec, value: Any, style: str, phrase: str | None = None) -> str:
        w, short = self.writer, style in SHORT_STYLES
        names = placeholders(template)
        fills: dict[str, str] = {}
        label = w.key(f, short) if "key" in names else w.label(f)
        fills["label"] = fills["key"] = mark(i, label, LABEL)
        fills["Label"] = mark(i, cap(label), LABEL)
        if "value" in names:
            # numbers as numbers: a special-value phrase ('never contacted before') does not fit '... stood at {value}'
            text = w.category(f, value, short) if f.type == "category" else w.number(f, value, phrases=False)
            fills["value"] = mark(i, text)
        if "count" in names:
            count, noun = w.count(f, value)
            fills["count"], fills["noun"] = mark(i, count), noun
        if "answer" in names:
            fills["answer"] = mark(i, w.answer(f, value))
        if "phrase" in names:
            assert phrase is not None
            fills["phrase"] = mark(i, phrase)
        return template.format(**{n: fills[n] for n in names})


def main(argv: list[str] | None = None) -> int:
    """``python -m llamdex.family FILE --schema S.json --show N``: validate a family file and print
    questions it renders for each schema (for whoever writes a family)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m llamdex.family", description=main.__doc__)
    p.add_argument("file", help="the family JSON file")
    p.add_argument("--schema", action="append", default=[], help="schema JSON to render for (repeatable)")
    p.add_argument("--show", type=int, default=3, help="questions to print per schema")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        family = load_family(args.file)
    except FamilyError as e:
        print(e)
        return 1
    n_clauses = len(family.clause_templates())
    print(f"{args.file}: valid ({n_clauses} clause templates, {len(family.templates())} templates in all)")
    from llamdex.synthetic import make_synthetic

    for path in args.schema:
        schema = load_schema(path)
        rows, _ = make_synthetic(schema, n_rows=max(args.show, 1), seed=args.seed)
        renderer = FamilyRenderer(schema, family, seed=args.seed)
        for row in rows.to_dict(orient="records")[:args.show]:
            print(f"\n--- {schema.name}: {row}\n{renderer.compose(row).text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
