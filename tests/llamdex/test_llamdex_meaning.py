"""The meaning reader: categories described in the user's own words (real all-MiniLM-L6-v2 from its wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamdex.embedding import shared_minilm
from llamdex.meaning import MeaningConfig, MeaningReader, clauses, user_text
from llamdex.schema import load_schema
from llamdex.vocabulary import value_phrases

SCHEMAS = Path(__file__).resolve().parents[2] / "examples" / "schemas"


@pytest.fixture(scope="module")
def nursery() -> MeaningReader:
    return MeaningReader(load_schema(SCHEMAS / "nursery.json"), shared_minilm())


def _in_vocabulary(reader: MeaningReader, text: str) -> bool:
    words = text.lower()
    return any(p.lower() in words for f in reader.features for ps in value_phrases(f) for p in ps if len(p) > 3)


@pytest.mark.parametrize(("text", "feature", "value"), [
    ("The family is in serious debt.", "finance", "inconv"),
    ("Our house is large and quiet.", "housing", "convenient"),
    ("The boy's current daycare is excellent.", "has_nurs", "proper"),
    ("Dad has a normal office job.", "parents", "usual"),
])
def test_a_category_said_in_other_words_is_read(nursery, text, feature, value):
    """Words no schema phrase contains (checked) are read as the value they mean."""
    assert not _in_vocabulary(nursery, text)
    read = nursery.read(text)
    assert read[feature].value == value and read[feature].clause in text


@pytest.mark.parametrize("text", ["Housing:", "Family finances: not given.",
                                  "How should this nursery school application be ranked?", "Thanks a lot!"])
def test_a_label_or_the_question_alone_fills_nothing(nursery, text):
    """A clause that names a feature (or asks the task's question) without saying a value reads nothing:
    the feature stays "not stated", never a made-up value."""
    assert nursery.read(text) == {}


def test_features_the_encoder_read_are_skipped(nursery):
    text = "The family is in serious debt."
    assert "finance" in nursery.read(text)
    assert "finance" not in nursery.read(text, skip=["finance"])


def test_a_clause_is_read_for_the_feature_it_is_closest_to(nursery):
    """"The family is in serious debt" is about money: with finance already read it fills no other feature."""
    assert nursery.read("The family is in serious debt.", skip=["finance"]) == {}


def test_stricter_thresholds_read_less(nursery):
    text = "The family is in serious debt. Our house is large and quiet."
    strict = MeaningReader(load_schema(SCHEMAS / "nursery.json"), shared_minilm(), MeaningConfig(threshold=0.99))
    assert len(nursery.read(text)) == 2 and strict.read(text) == {}


def test_fallback_reads_the_closest_clause_that_passes_every_check():
    """"The finances, well." is the clause closest to finance's values but names the topic only (it fails the
    margin checks); without ``fallback`` finance stays not stated, with it the next clause that passes every
    check is read. A bare label alone still fills nothing either way."""
    schema = load_schema(SCHEMAS / "nursery.json")
    text = "The finances, well. We are in serious debt."
    plain = MeaningReader(schema, shared_minilm(), MeaningConfig(fallback=False))
    falls_back = MeaningReader(schema, shared_minilm(), MeaningConfig(fallback=True))
    assert "finance" not in plain.read(text)
    read = falls_back.read(text)["finance"]
    assert read.value == "inconv" and read.clause == "We are in serious debt"
    assert falls_back.read("Housing:") == {} and falls_back.read("Family finances: not given.") == {}


def test_clauses_cut_sentences_and_drop_chat_markup():
    prompt = "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\nWe are broke, and the flat is tiny (two rooms)." \
             "<|im_end|>\n<|im_start|>assistant\n"
    assert clauses(user_text(prompt, "Answer.")) == ["We are broke", "the flat is tiny", "two rooms"]


def test_a_category_read_by_meaning_is_what_the_expert_gets(lm, toy):
    """Through the serving path: "a young lady" names no value of ``sex`` (no mention, so the encoder must say
    "not stated"); with the reader the expert gets ``female`` one-hot, the response says where it was read,
    and the expert's answer equals the expert run on exactly those features."""
    import torch

    from llamdex.expert import predict_proba
    from llamdex.insertion import predict
    from tests.llamdex.conftest import make_bundle

    model, tok, _ = lm
    toy["features"][2]["synonyms"] = {"male": ["man"], "female": ["woman"]}
    plain = make_bundle(lm, toy, layer=2, n=2)
    reading = plain.with_meaning(shared_minilm())
    question = "A young lady travelled on the ship. Did she survive?"
    before, after = predict(model, tok, plain, question), predict(model, tok, reading, question)
    assert "sex" in before["not_stated"] and before["read_by_meaning"] == {}
    assert after["read_by_meaning"]["sex"]["value"] == "female" and "sex" in after["stated"]
    sex = plain.codec.slices["sex"]
    encoded = torch.tensor(after["encoded_features"])
    assert encoded[sex].tolist() == [0.0, 1.0] and after["features"]["sex"] == "female"
    expected = predict_proba(plain.expert, encoded[None])[0].tolist()
    assert list(after["expert_probabilities"].values()) == pytest.approx(expected, abs=1e-6)
    others = [i for i in range(encoded.shape[0]) if not sex.start <= i < sex.stop]
    assert encoded[others].tolist() == pytest.approx(torch.tensor(before["encoded_features"])[others].tolist())
