"""Tenant schema: accepts the documented shape, refuses everything else with field + fix."""

from __future__ import annotations

import json

import pytest

from llamdex.schema import SchemaError, TenantSchema, load_schema


def test_valid_schema_loads_from_dict_json_text_and_path(toy, tmp_path):
    s = load_schema(toy)
    assert isinstance(s, TenantSchema)
    assert [f.name for f in s.features] == ["age", "fare", "sex", "alone"]
    assert s.class_names == ["no", "yes"]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(toy))
    assert load_schema(path) == s
    assert load_schema(str(path)) == s
    assert load_schema(json.dumps(toy)) == s
    assert load_schema(s) is s


def test_sha256_is_stable_and_content_sensitive(toy):
    a = load_schema(toy).sha256()
    assert a == load_schema(json.loads(json.dumps(toy))).sha256()
    toy["features"][0]["range"] = [0, 101]
    assert load_schema(toy).sha256() != a


def _reject(data) -> list[str]:
    with pytest.raises(SchemaError) as info:
        load_schema(data)
    assert all("; fix: " in line for line in info.value.problems), info.value.problems
    return info.value.problems


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda d: d["features"][0].update(range=[5, 1]), "features[0].range", "lower bound must be < upper"),
        (lambda d: d["features"][0].update(range=[0, float("inf")]), "features[0].range", "finite"),
        (lambda d: d["features"][0].update(range=[0, 1, 2]), "features[0].range", "[lower, upper]"),
        (lambda d: d["features"][0].update(range=[0.5, 10]), "features[0].range", "whole numbers"),
        (lambda d: d["features"][0].pop("range"), "features[0].range", "required"),
        (lambda d: d["features"][0].update(range=["a", 1]), "features[0].range[0]", "valid number"),
        (lambda d: d["features"][1].update(categories=["x", "y"]), "features[1].categories", "not allowed"),
        (lambda d: d["features"][2].update(categories=["male"]), "features[2].categories", "at least 2"),
        (lambda d: d["features"][2].update(categories=["m", "m"]), "features[2].categories", "duplicate"),
        (lambda d: d["features"][2].update(categories=["m", ""]), "features[2].categories[1]", "non-empty"),
        (lambda d: d["features"][2].pop("categories"), "features[2].categories", "required"),
        (lambda d: d["features"][2].update(range=[0, 1]), "features[2].range", "not allowed"),
        (lambda d: d["features"][3].update(range=[0, 1]), "features[3].range", "not allowed"),
        (lambda d: d["features"][3].update(categories=["a", "b"]), "features[3].categories", "not allowed"),
        (lambda d: d["features"][3].update(unit="kg"), "features[3].unit", "not allowed"),
        (lambda d: d["features"][0].update(decimals=2), "features[0].decimals", "only allowed for type 'float'"),
        (lambda d: d["features"][0].update(type="string"), "features[0].type", "'int'"),
        (lambda d: d["features"][0].update(name="Age"), "features[0].name", "invalid name"),
        (lambda d: d["features"][0].update(name="a" * 65), "features[0].name", "invalid name"),
        (lambda d: d["features"][1].update(name="age"), "features[1].name", "duplicate feature name"),
        (lambda d: d["features"][0].update(rnage=[0, 1]), "features[0].rnage", "Extra inputs"),
        (lambda d: d.update(subjekt="x"), "subjekt", "Extra inputs"),
        (lambda d: d["target"].update(classes=[{"name": "yes"}]), "target.classes", "at least 2"),
        (lambda d: d["target"].update(classes=[{"name": "y"}, {"name": "y"}]), "target.classes", "duplicate"),
        (lambda d: d["target"]["classes"][0].update(label="x"), "target.classes[0].label", "Extra inputs"),
        (lambda d: d["target"].update(name="age"), "target.name", "also a feature name"),
        (lambda d: d["target"].update(question=" "), "target.question", "must not be empty"),
        (lambda d: d["target"].pop("question"), "target.question", "Field required"),
        (lambda d: d.update(features=[]), "features", "at least 1 feature"),
        (lambda d: d.update(name="my schema"), "name", "invalid name"),
        # vocabulary (issue 16): synonyms keyed by the feature's values, never shared by two values
        (lambda d: d["features"][2].update(synonyms={"female": ["woman", "Male"]}), "features[2].synonyms.female[1]",
         "already means 'male'"),
        (lambda d: d["features"][2].update(synonyms={"male": ["guy"], "female": ["Guy"]}),
         "features[2].synonyms.female[0]", "already means 'male'"),
        (lambda d: d["features"][2].update(synonyms={"woman": ["lady"]}), "features[2].synonyms.woman",
         "not a value of this feature"),
        (lambda d: d["features"][2].update(synonyms={"male": [" man"]}), "features[2].synonyms.male[0]",
         "without surrounding spaces"),
        (lambda d: d["features"][3].update(synonyms={"yes": ["alone"]}), "features[3].synonyms.yes", "'false', 'true'"),
        (lambda d: d["features"][0].update(synonyms={"old": ["ancient"]}), "features[0].synonyms.old", "not a number"),
        (lambda d: d["features"][0].update(synonyms={"200": ["ancient"]}), "features[0].synonyms.200", "outside the range"),
        (lambda d: d["features"][0].update(synonyms={"0": ["12"]}), "features[0].synonyms.0[0]", "no letters"),
        (lambda d: d["features"][0].update(nouns=[["year"]]), "features[0].nouns[0]", "[singular, plural]"),
        (lambda d: d["features"][1].update(nouns=[["pound", "pounds"]]), "features[1].nouns", "only allowed for type 'int'"),
        (lambda d: d["features"][0].update(default=101), "features[0].default", "in the range"),
        (lambda d: d["features"][0].update(default=2.5), "features[0].default", "whole number"),
        (lambda d: d["features"][3].update(default=1), "features[3].default", "true or false"),
        (lambda d: d["features"][2].update(default="male"), "features[2].default", "not allowed for type 'category'"),
        (lambda d: d["features"][2].update(unit_aliases=["kg"]), "features[2].unit_aliases", "not allowed"),
        (lambda d: d["features"][1].update(unit=None, unit_aliases=["quid"]), "features[1].unit_aliases", "needs 'unit'"),
        (lambda d: d["target"]["classes"][1].update(synonyms=["lived", "No"]), "target.classes[1].synonyms[1]",
         "already means class 'no'"),
    ],
)
def test_each_rejection_names_the_field(toy, mutate, path, fragment):
    mutate(toy)
    problems = _reject(toy)
    hits = [p for p in problems if p.startswith(path + ":")]
    assert hits, f"no problem reported at {path}: {problems}"
    assert any(fragment in p for p in hits), hits


def test_vocabulary_lists_every_way_to_write_a_value(toy):
    toy["features"][2]["synonyms"] = {"female": ["woman", "girl"]}
    toy["features"][3]["synonyms"] = {"true": ["on their own"]}
    toy["features"][0].update(synonyms={"0": ["newborn"]}, nouns=[["year", "years"]], default=30)
    schema = load_schema(toy)
    assert schema.feature("sex").phrases() == {"male": ["male"], "female": ["female", "woman", "girl"]}
    assert schema.feature("alone").phrases() == {"false": [], "true": ["on their own"]}
    assert schema.feature("age").phrases() == {"0": ["newborn"]} and schema.feature("age").default == 30


def test_message_format_matches_the_documented_example(toy):
    toy["features"][2] = {"name": "w", "type": "int", "range": [5, 1]}
    (line,) = _reject(toy)
    assert line.startswith("features[2].range: lower bound must be < upper bound (got [5, 1]); fix: ")


def test_all_problems_are_listed_at_once(toy):
    toy["features"][0]["range"] = [5, 1]
    toy["features"][1]["rang"] = 3
    toy["features"][3]["name"] = "age"  # duplicate, reported even though other features are broken
    toy["target"]["classes"] = [{"name": "x"}]
    problems = _reject(toy)
    for path in ("features[0].range", "features[1].rang", "features[3].name", "target.classes"):
        assert any(p.startswith(path + ":") for p in problems), (path, problems)
    assert "features[0].range" in str(SchemaError(problems))


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ('{"name": "a", "name": "b"}', "key appears twice"),
        ('{"name": ', "not valid JSON"),
        ("does/not/exist.json", "no schema file"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_unreadable_sources_are_schema_errors(source, fragment, tmp_path):
    if source.startswith("["):
        path = tmp_path / "list.json"
        path.write_text(source)
        source = path
    problems = _reject(source)
    assert any(fragment in p for p in problems), problems


def test_schema_error_is_a_value_error():
    assert issubclass(SchemaError, ValueError)


def test_feature_lookup_names_known_features(toy):
    s = load_schema(toy)
    assert s.feature("fare").hi == 600
    with pytest.raises(KeyError, match="known"):
        s.feature("nope")
