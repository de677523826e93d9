"""The training grammar: disjoint from every held-out family, values where the spans say, diverse."""

from __future__ import annotations

import dataclasses
import re

import pytest

from llamdex import phrasings as ph
from llamdex.family import FAMILY_FILES, load_family, placeholders
from llamdex.literals import candidates, token_literals
from llamdex.questions import QuestionGenerator
from llamdex.render import format_number
from llamdex.synthetic import make_synthetic
from llamdex.vocabulary import number_words, value_phrases

PAPER = ("titanic", "wine", "nursery", "bank")
_LABEL = {"label", "Label", "key"}
_VALUE = {"value", "answer", "count", "phrase"}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _normal_template(t: str) -> str:
    """Placeholders unified ({L} label, {V} value, {Q} question), lower case, single spaces."""
    out = t
    for name in set(placeholders(t)):
        tag = "L" if name in _LABEL else "V" if name in _VALUE else "Q" if name.startswith("question") else name
        out = out.replace("{" + name + "}", "{" + tag + "}")
    return _norm(out)


def connectors_of(template: str) -> list[str]:
    """The text between a label and a value placeholder (either order), normalised; '' if none."""
    parts = re.split(r"(\{[A-Za-z_]+\})", template)
    out = []
    for i in range(1, len(parts) - 2, 2):
        a, b = parts[i][1:-1], parts[i + 2][1:-1]
        if {a, b} & _LABEL and {a, b} & _VALUE:
            out.append(_norm(parts[i + 1]))
    return out


def _wordy(connector: str) -> bool:
    return any(c.isalpha() for c in connector)


def training_templates() -> set[str]:
    """Every clause/frame template the training grammar can write, normalised."""
    out = set()
    for prefix in ph.LABEL_PREFIXES + ("", "the ", "a ", "its "):
        for c in ph.forward_connectors():
            out.add(_normal_template(prefix + "{label}" + c + "{value}"))
    for c in ph.backward_connectors():
        for det in ("", "the ", "its ", "their "):
            out.add(_normal_template("{value}" + c + det + "{label}"))
    pools = (ph.COUNT_CLAUSES, ph.BOOL_ANSWER, ph.BOOL_FALSE, ph.BOOL_PHRASE, ph.CATEGORY_BARE,
             ph.UNSTATED, ph.OPENERS, ph.DISTRACTORS, ph.CLOSERS, ph.LEADINS, ph.PERSON_OF)
    for pool in pools:
        for t in pool:
            out.add(_normal_template(t.replace("[", "").replace("]", "").replace("{q}", "{question}")
                                     .replace("{ql}", "{question_lc}")))
    return out - {""}


def training_connectors() -> set[str]:
    """Every connector phrase between a label and a value the training grammar writes (with letters)."""
    out = {_norm(c) for c in ph.forward_connectors() + ph.backward_connectors()}
    for pool in (ph.BOOL_ANSWER, ph.COUNT_CLAUSES, ph.PERSON_OF):
        for t in pool:
            out.update(connectors_of(t))
    return {c for c in out if _wordy(c)}


def _heldout_families() -> dict[str, list[str]]:
    """name -> clause and frame templates of every held-out family on disk, and the old one."""
    out = {}
    for split, path in FAMILY_FILES.items():
        if path.exists():
            out[split] = load_family(path).templates()
    old = ph.HELDOUT
    out["old heldout"] = [t for pool in dataclasses.astuple(old) for t in pool if isinstance(t, str)]
    return out


def test_heldout_families_share_no_template_and_no_connector_phrase_with_training():
    """The issue's disjointness: no held-out template equals a training template and no held-out
    connector phrase (the words joining a label and a value) is one the training grammar writes.
    Only punctuation-only templates such as '{key}={value}' (record conventions the grammar must
    know) may coincide; they carry no words."""
    train_t, train_c = training_templates(), training_connectors()
    families = _heldout_families()
    assert "validation" in families and "old heldout" in families
    for name, templates in families.items():
        shared_t = sorted(t for t in templates if _normal_template(t) in train_t
                          and any(c.isalpha() for c in re.sub(r"\{[^}]*\}", "", t)))
        shared_c = sorted({c for t in templates for c in connectors_of(t) if _wordy(c) and c in train_c})
        assert not shared_t, (name, "templates", shared_t)
        assert not shared_c, (name, "connector phrases", shared_c)


def test_the_disjointness_check_catches_a_shared_connector():
    train_c = training_connectors()
    assert "was" in train_c and "stands at" in train_c and "came to" not in train_c and "is" not in train_c
    assert connectors_of("the {label} stands at {value} today") == ["stands at"]
    assert connectors_of("{value} is the figure given for {Label}") == ["is the figure given for"]


def test_fixed_training_text_has_no_digits():
    pools = [getattr(ph, n) for n in dir(ph) if n.isupper() and isinstance(getattr(ph, n), tuple)]
    for pool in pools:
        for item in pool:
            for text in item if isinstance(item, tuple) else (item,):
                if isinstance(text, str):
                    assert not re.search(r"\d", text), text


@pytest.fixture(scope="module")
def rows_by_schema(paper_splits):
    out = {}
    for name in PAPER:
        splits = paper_splits[name]
        synth, _ = make_synthetic(splits.schema, n_rows=60, seed=1)
        out[name] = (splits.schema, splits.fit.head(60).to_dict("records") + synth.to_dict("records"))
    return out


def _value_ok(f, value, written: str) -> bool:
    w = written.lower()
    if f.type == "category":
        return w in [p.lower() for p in value_phrases(f)[f.categories.index(value)]]
    if f.type == "bool":
        return w in [p.lower() for p in value_phrases(f)[int(value)]] or \
            w in (("yes", "true", "yeah") if value else ("no", "false", "nope", "not", "without", "never", "n't", "none"))
    if f.nouns and w in (("no", "zero") if value == 0 else ("a", "an", "one") if value == 1 else ()):
        return True
    number = float(format_number(value, f))
    special = [p.lower() for v, ps in zip(f.synonyms, value_phrases(f), strict=True) if float(v) == number for p in ps]
    forms = {format_number(value, f), f"{number:,.{len(format_number(value, f).partition('.')[2])}f}"}
    if number == int(number) and 0 <= number < 1e6:
        forms.add(number_words(int(number)))
    return w in special or any(x in w for x in forms)


def test_every_stated_value_is_where_the_spans_say_and_unstated_ones_are_not_written(rows_by_schema):
    for schema, rows in rows_by_schema.values():
        gen = QuestionGenerator(schema, seed=2)
        for row in rows:
            q = gen.compose(row, "train")
            assert schema.target.question.strip()[1:] in q.text
            for f in schema.features:
                spans = q.all_spans(f.name)
                if f.name not in q.stated:
                    assert not spans, (f.name, q.text)
                    continue
                assert spans, (f.name, q.text)
                for a, b in spans:
                    assert _value_ok(f, row[f.name], q.text[a:b]), (f.name, row[f.name], q.text[a:b], q.text)


def test_questions_leave_features_out_and_use_every_style(rows_by_schema):
    schema, rows = rows_by_schema["titanic"]
    gen = QuestionGenerator(schema, seed=0)
    qs = [gen.compose(rows[i % len(rows)], "train") for i in range(400)]
    unstated = sum(len(schema.features) - len(q.stated) for q in qs) / (400 * len(schema.features))
    assert 0.08 < unstated < 0.25
    texts = [q.text for q in qs]
    assert len(set(texts)) == 400
    assert any("\n" in t and "=" not in t and t.count(";") + t.count(",") > 4 for t in texts)  # csv/list
    assert any(re.search(r"\b(she|he)\b", t, re.I) for t in texts)  # narrative pronouns
    assert any(re.search(r"\bno (siblings|parents|children|brothers)", t, re.I) for t in texts)  # zero counts
    assert any("£" in t for t in texts) and any(re.search(r"\b(woman|girl|lady|steerage|3rd)\b", t) for t in texts)


def test_every_stated_value_has_a_token_the_encoder_can_copy(rows_by_schema, lm):
    """Each value the grammar writes lands on a candidate token of its feature (a literal of its kind
    or a mention of its own value), so the copy pointer always has a target."""
    from llamdex.codec import FeatureCodec
    from llamdex.pipeline import locate_values
    from llamdex.prompting import chat_prompt_ids

    _, tok, _ = lm
    for schema, rows in rows_by_schema.values():
        gen = QuestionGenerator(schema, seed=3)
        qs = [gen.compose(r, "train") for r in rows[:40]]
        prompts = chat_prompt_ids(tok, "Answer.", [q.text for q in qs])
        _, where, _ = locate_values(tok, schema, prompts, qs)
        for q, w in zip(qs, where, strict=True):
            for name in q.stated:
                assert w.get(name), (schema.name, name, q.text)
        assert FeatureCodec(schema).m and candidates is not None and token_literals is not None


def test_no_distractor_speaks_a_value_of_the_schema(rows_by_schema):
    """A distractor that uses a schema's own value words ("My sister is 4." beside titanic's sibsp) would teach
    the encoder to ignore the passenger's sister; each schema's distractors avoid its nouns and category phrases."""
    import random

    from llamdex.grammar import TrainingGrammar, schema_phrases, speaks

    titanic = rows_by_schema["titanic"][0]
    assert {"sister", "brother", "steerage", "woman"} <= schema_phrases(titanic)
    assert not {"her", "one"} & schema_phrases(titanic)  # pronouns and number words stay allowed
    assert speaks("My sister is {n}.", schema_phrases(titanic)) and not speaks("{n} sisters", frozenset({"sister"}))
    for schema, _ in rows_by_schema.values():
        grammar = TrainingGrammar(schema, random.Random(0))
        assert grammar.distractors and not any(speaks(d, schema_phrases(schema)) for d in grammar.distractors)
    assert "My sister is {n}." not in TrainingGrammar(titanic, random.Random(0)).distractors


def test_records_write_an_ordinal_class_by_its_code(rows_by_schema):
    """Records code ordinal classes as numbers ('pclass=1', as the Kaggle table does); prose never does."""
    import random

    from llamdex.render import ValueWriter

    schema = rows_by_schema["titanic"][0]
    pclass = next(f for f in schema.features if f.name == "pclass")
    writer = ValueWriter(random.Random(0))
    short = [writer.category(pclass, "first", short=True) for _ in range(400)]
    assert 0.15 < short.count("1") / 400 < 0.45
    assert "1" not in {writer.category(pclass, "first") for _ in range(400)}
    nursery = rows_by_schema["nursery"][0]
    children = next(f for f in nursery.features if f.name == "children")  # cardinal names: no code path
    assert {writer.category(children, "1", short=True) for _ in range(200)} <= set(value_phrases(children)[0])


def test_a_phrase_several_features_share_is_written_once_for_all_and_only_when_the_row_agrees(rows_by_schema):
    """Titanic's "travelling alone" says sibsp 0 *and* parch 0: the grammar writes it as one value of both
    (one span, both features), and never for one of them while the other holds another value; a phrase
    whose words imply a category ("her husband": female) is written only for rows holding that category."""
    from llamdex.grammar import numeric_phrases

    schema = rows_by_schema["titanic"][0]
    table = numeric_phrases(schema)
    shared = {p for p, use in table.items() if len(use.says) > 1}
    assert {"travelling alone", "no family aboard"} <= shared
    base = {"pclass": "third", "sex": "male", "age": 30.0, "fare": 8.05}
    gen = QuestionGenerator(schema, seed=5)

    def written(row: dict, n: int = 300) -> list[tuple[str, dict[str, list[tuple[int, int]]]]]:
        out = []
        for _ in range(n):
            q = gen.compose(row, "train")
            out.append((q.text, {f: q.all_spans(f) for f in ("sibsp", "parch")}))
        return out

    together = 0
    for text, spans in written(base | {"sibsp": 0, "parch": 0}):
        for a, b in spans["sibsp"]:
            if text[a:b].lower() in shared:
                assert (a, b) in spans["parch"], text  # one phrase, both features
                together += 1
    assert together > 30
    for row in (base | {"sibsp": 0, "parch": 3}, base | {"sibsp": 2, "parch": 0}):
        for text, spans in written(row):
            said = {text[a:b].lower() for s in spans.values() for a, b in s}
            assert not said & shared, text
    sex = [f.name for f in schema.features].index("sex")
    hers = {p for p, use in table.items() if use.implies.get(sex) == "female"}
    assert {"her husband", "her sister"} <= hers
    for text, spans in written(base | {"sibsp": 1, "parch": 0}, n=400):
        assert not {text[a:b].lower() for a, b in spans["sibsp"]} & hers, text
    woman = []
    for _ in range(400):  # ... and only when the row's sex is stated too ("her" is then never "nothing said")
        q = gen.compose(base | {"sex": "female", "sibsp": 1, "parch": 0}, "train")
        if {q.text[a:b].lower() for a, b in q.all_spans("sibsp")} & hers:
            assert "sex" in q.stated, q.text
            woman.append(q.text)
    assert woman
