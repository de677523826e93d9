"""Template questions: held-out phrasings stay out of training, values are recoverable."""

from __future__ import annotations

import dataclasses
import re

import pytest

from llamdex.phrasings import HELDOUT, TRAIN
from llamdex.questions import QuestionGenerator, format_number, number_words
from llamdex.schema import load_schema
from llamdex.synthetic import make_synthetic

PAPER = ("titanic", "wine", "nursery", "bank")


def _fragments(family) -> set[str]:
    """Literal text of every phrasing of a family (placeholders removed), >= 4 letters long."""
    out = set()
    for pool in dataclasses.astuple(family):
        for item in pool:
            for text in item if isinstance(item, tuple) else (item,):
                for part in re.split(r"\{[a-z_]+\}", text):
                    part = part.strip(" ,.:?")
                    if sum(ch.isalpha() for ch in part) >= 4:
                        out.add(part)
    return out


def _contains(text: str, fragment: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(fragment) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


@pytest.fixture
def rows_by_schema(paper_datasets):
    out = {}
    for name in PAPER:
        schema, train, _ = paper_datasets[name]
        synth, _ = make_synthetic(schema, n_rows=60, seed=1)
        out[name] = (schema, train.head(60).to_dict("records") + synth.to_dict("records"))
    return out


def test_families_share_no_phrasing():
    for pool in dataclasses.fields(TRAIN):
        if pool.name in ("yes_no", "styles"):  # value words / layout names (separators differ)
            continue
        shared = set(getattr(TRAIN, pool.name)) & set(getattr(HELDOUT, pool.name))
        assert not shared, (pool.name, shared)
    for family in (TRAIN, HELDOUT):
        for pool in dataclasses.astuple(family):
            for item in pool:
                assert not re.search(r"\d", str(item)), f"digits in fixed text: {item!r}"


def test_heldout_phrasings_never_appear_in_train_output(rows_by_schema):
    heldout = _fragments(HELDOUT)
    train_only = _fragments(TRAIN) - heldout
    assert len(heldout) >= 10
    for name, (schema, rows) in rows_by_schema.items():
        gen = QuestionGenerator(schema, seed=0)
        for row in rows:
            text = gen.make(row, "train")
            leaked = [f for f in heldout if _contains(text, f)]
            assert not leaked, (name, leaked, text)
            held = gen.make(row, "heldout")
            assert any(_contains(held, f) for f in heldout), held
            for frag in ("stands at", "recorded as", "listed as", "Question", "Based on this"):
                assert frag in train_only and not _contains(held, frag), (frag, held)


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_every_present_value_is_recoverable(rows_by_schema, family):
    for schema, rows in rows_by_schema.values():
        gen = QuestionGenerator(schema, seed=2)
        for row in rows:
            q = gen.compose(row, family)
            for f in schema.features:
                value = row[f.name]
                if value is None or value != value:  # missing -> omitted
                    assert f.name not in q.clauses
                    continue
                clause = q.clauses[f.name]
                assert clause.lower() in q.text.lower()  # sentence starts may be capitalised
                if f.type == "bool":  # the answer word, at either end of the clause
                    answer = q.text[slice(*q.spans[f.name])].lower()
                    assert answer in (("yes", "true") if value else ("no", "false")), clause
                    assert answer in (clause.split()[-1], clause.split()[0].lower()), clause
                elif f.type == "category":
                    assert value.replace("_", " ") in clause, (value, clause)
                else:
                    digits = format_number(value, f)
                    forms = [digits, f"{int(float(digits)):,}" if "." not in digits else digits]
                    if f.type == "int" and 0 <= int(digits) <= 100:
                        forms.append(number_words(int(digits)))
                    pattern = "|".join(r"(?<![\d.,])" + re.escape(x) + r"(?![\d]|\.\d)" for x in forms)
                    assert re.search(pattern, clause), (f.name, value, forms, clause)


def test_missing_values_are_left_out(toy):
    gen = QuestionGenerator(toy, seed=0)
    for _ in range(50):
        q = gen.compose({"age": 30, "fare": 12.5, "sex": None, "alone": True})
        assert set(q.clauses) == {"age", "fare", "alone"}
        assert not re.search(r"\b(fe)?male\b", q.text)


def test_target_question_comes_last_and_text_is_diverse(toy):
    gen = QuestionGenerator(toy, seed=0)
    row = {"age": 42, "fare": 7.25, "sex": "male", "alone": False}
    texts = [gen.make(row) for _ in range(300)]
    assert all(t.endswith("id the passenger survive?") for t in texts)
    assert len(set(texts)) > 250
    first_field = {min(("age", "fare", "sex", "alone"), key=lambda n, t=t: gen_pos(t, row, n)) for t in texts}
    assert len(first_field) >= 3  # field order is shuffled
    assert any("forty-two" in t for t in texts) and any("42 years" in t for t in texts)
    assert any("\n- " in t for t in texts) and any("; " in t for t in texts)


def gen_pos(text: str, row: dict, name: str) -> int:
    needles = {"age": ("42", "forty-two"), "fare": ("7.25",), "sex": ("male",), "alone": ("travelling alone",)}
    return min((text.find(n) for n in needles[name] if n in text), default=len(text))


def test_deterministic_by_seed(toy):
    row = {"age": 42, "fare": 7.25, "sex": "male", "alone": False}
    a = [QuestionGenerator(toy, seed=1).make(row) for _ in range(3)]
    g1, g2, g3 = QuestionGenerator(toy, seed=1), QuestionGenerator(toy, seed=1), QuestionGenerator(toy, seed=2)
    assert [g1.make(row) for _ in range(5)] == [g2.make(row) for _ in range(5)]
    assert [g1.make(row) for _ in range(5)] != [g3.make(row) for _ in range(5)]
    assert len(set(a)) == 1
    g4 = QuestionGenerator(toy, seed=1)
    assert QuestionGenerator(toy, seed=1).make_many([row, row]) == [g4.make(row), g4.make(row)]


def test_refusals_name_the_argument(toy):
    gen = QuestionGenerator(toy)
    with pytest.raises(ValueError, match="family: 'test' is not a phrasing family; fix"):
        gen.make({"age": 1, "fare": 1.0, "sex": "male", "alone": True}, family="test")
    with pytest.raises(ValueError, match="row: feature 'alone' is absent; fix"):
        gen.make({"age": 1, "fare": 1.0, "sex": "male"})
    with pytest.raises(ValueError, match="sex: unknown category 'x'"):
        gen.make({"age": 1, "fare": 1.0, "sex": "x", "alone": True})


def test_number_helpers(toy):
    assert [number_words(n) for n in (0, 13, 40, 42, 100, 999)] == [
        "zero", "thirteen", "forty", "forty-two", "one hundred", "nine hundred and ninety-nine"]
    fare = load_schema(toy).feature("fare")
    age = load_schema(toy).feature("age")
    assert format_number(22.0, fare) == "22" and format_number(7.2500, fare) == "7.25"
    assert format_number(7.256, fare) == "7.26" and format_number(41.6, age) == "42"
