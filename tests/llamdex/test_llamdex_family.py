"""Phrasing families as data: strict validation, and rendered questions whose spans hold the values."""

from __future__ import annotations

import copy
import json
import re

import pytest

from llamdex.family import FAMILY_FILES, FamilyError, FamilyRenderer, load_family
from llamdex.render import format_number
from llamdex.schema import load_schema
from llamdex.synthetic import make_synthetic
from llamdex.vocabulary import number_words, value_phrases

PAPER = ("titanic", "wine", "nursery", "bank")


@pytest.fixture(scope="module")
def validation_family() -> dict:
    return json.loads(FAMILY_FILES["validation"].read_text())


def _reject(data) -> list[str]:
    with pytest.raises(FamilyError) as info:
        load_family(data)
    assert all("; fix: " in p for p in info.value.problems), info.value.problems
    return info.value.problems


@pytest.mark.parametrize(("mutate", "path", "fragment"), [
    (lambda d: d["styles"].pop("terse"), "styles", "missing style(s) ['terse']"),
    (lambda d: d["styles"]["record"]["clauses"]["numeric"].append("{label} has {value} {value}"),
     "styles.record.clauses.numeric[5]", "more than once"),
    (lambda d: d["styles"]["record"]["clauses"]["numeric"].append("{label} was 3 or {value}"),
     "styles.record.clauses.numeric[5]", "digits"),
    (lambda d: d["styles"]["record"]["clauses"]["category"].append("{label} is {valeu}"),
     "styles.record.clauses.category[5]", "unknown placeholder"),
    (lambda d: d["styles"]["record"]["clauses"]["category"].append("it was {value}"),
     "styles.record.clauses.category[5]", "needs one of ['Label', 'key', 'label']"),
    (lambda d: d["styles"]["terse"]["clauses"]["bool"].append("{answer}!"), "styles.terse.clauses.bool[4]",
     "bare yes/no"),
    (lambda d: d["styles"]["terse"]["documents"].__setitem__(0, "{fields}"), "styles.terse.documents[0]",
     "needs one of ['question']"),
    (lambda d: d["styles"]["terse"]["clauses"].__setitem__("count", ["{count} {noun}"]),
     "styles.terse.clauses.count", "at least 3"),
    (lambda d: d["styles"]["terse"].update(colour="red"), "styles.terse.colour", "Extra inputs"),
    (lambda d: d["styles"]["terse"]["questions"].append("{question"), "styles.terse.questions[4]", "bad braces"),
    (lambda d: d.update(asides=d["asides"][:3]), "asides", "at least 8"),
    (lambda d: d.update(version=2), "version", "Input should be 1"),
])
def test_each_rejection_names_the_field(validation_family, mutate, path, fragment):
    data = copy.deepcopy(validation_family)
    mutate(data)
    problems = _reject(data)
    hits = [p for p in problems if p.startswith(path + ":")]
    assert hits and any(fragment in p for p in hits), problems


def test_families_on_disk_are_valid():
    for split, path in FAMILY_FILES.items():
        family = load_family(path)  # the blind test family is written: a missing file fails here
        assert len(family.clause_templates()) >= 30, split


@pytest.mark.parametrize("name", PAPER)
def test_rendered_values_are_where_the_spans_say(name, validation_family):
    schema = load_schema(f"examples/schemas/{name}.json")
    rows, _ = make_synthetic(schema, n_rows=40, seed=3)
    renderer = FamilyRenderer(schema, load_family(validation_family), seed=1)
    styles_seen = set()
    for row in rows.to_dict(orient="records"):
        q = renderer.compose(row)
        assert q.text.endswith(schema.target.question.strip().rstrip("?") + "?") or schema.target.question in q.text \
            or schema.target.question[1:] in q.text
        assert not re.search("[\x02\x03\x04]", q.text)
        for f in schema.features:
            value = row[f.name]
            if value is None:
                assert f.name not in q.spans and f.name not in q.stated
                continue
            written = q.text[slice(*q.spans[f.name])]
            assert f.name in q.stated
            if f.type == "category":
                assert written.lower() in [p.lower() for p in value_phrases(f)[f.categories.index(value)]], written
            elif f.type == "bool":
                ok = [p.lower() for p in value_phrases(f)[int(value)]] + (["yes", "true"] if value else ["no", "false"])
                assert written.lower() in ok, (f.name, value, written)
            else:
                digits = format_number(value, f)
                number = float(digits)
                forms = {digits, f"{number:,.{len(digits.partition('.')[2])}f}"}
                if number == int(number) and 0 <= number < 1e6:
                    forms.add(number_words(int(number)))
                if f.nouns and number in (0, 1):
                    forms |= {"no", "zero", "a", "an", "one"}
                special = [p for v, ps in zip(f.synonyms, value_phrases(f), strict=True) if float(v) == number for p in ps]
                assert any(form in written.lower() for form in forms) or written.lower() in special, (f.name, value, written)
        styles_seen.add(q.text[:3])
    assert len(styles_seen) > 5
