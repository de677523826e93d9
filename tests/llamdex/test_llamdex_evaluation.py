"""Test-set construction, the baselines' scorers and the Expert-API parser (tiny-random, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.evaluation import accuracy, base_llm_scores, chat_replies, eval_set, fluent, llamdex_scores
from llamdex.expert_api import expert_api_inputs, generate_queries, parse_reply, schema_prompt
from llamdex.prompting import answer_tokens
from llamdex.schema import load_schema
from tests.llamdex.conftest import make_bundle


def test_validation_set_uses_validation_rows_and_family(paper_splits):
    splits = paper_splits["titanic"]
    schema = splits.schema
    vs = eval_set(splits, "validation", max_rows=40, seed=3)
    assert (vs.split, vs.family) == ("validation", "validation")
    assert len(vs.questions) == 40 and vs.x.shape == (40, FeatureCodec(schema).m)
    assert set(vs.y) <= {0, 1} and schema.target.question[1:] in vs.questions[0]
    assert eval_set(splits, "validation", max_rows=40, seed=3).questions == vs.questions  # deterministic
    assert accuracy(np.eye(2)[vs.y], vs.y) == 1.0
    old = eval_set(splits, "validation", "heldout", max_rows=40, seed=3)
    assert old.family == "heldout" and old.questions != vs.questions


def test_splits_are_disjoint_and_the_validation_rows_come_from_the_training_side(paper_splits):
    import pandas as pd

    for splits in paper_splits.values():
        assert len(splits.fit) + len(splits.validation) == len(splits.train)
        assert abs(len(splits.validation) / len(splits.train) - 0.2) < 0.01
        key = [c for c in splits.train.columns]
        both = pd.concat([splits.fit, splits.validation]).sort_values(key).reset_index(drop=True)
        assert both.equals(splits.train.sort_values(key).reset_index(drop=True))
        assert splits.expert_rows("validation") is splits.fit and splits.expert_rows("test") is splits.train


@pytest.mark.parametrize(("split", "family"), [("validation", "test"), ("test", "validation"), ("test", "train"),
                                               ("train", None), ("fit", None)])
def test_the_wrong_split_family_pairs_are_refused(paper_splits, split, family):
    with pytest.raises(ValueError, match="split|family"):
        eval_set(paper_splits["titanic"], split, family, max_rows=5)


def test_only_the_final_accuracy_bench_reads_the_test_split():
    """The ablation, tuning, budget and speed tools cannot select the test split: outside
    bench/llamdex_accuracy.py every eval_set call asks for literal 'validation' rows, nobody touches
    a DatasetSplits' .test rows, and the only 80/20 loader call outside llamdex/ keeps the training side.
    The one exception is the membership-inference audit (bench/privacy_audit.py): it measures the
    experts' privacy on a pool drawn from the whole table and chooses no Llamdex design or default."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    calls = 0
    for folder in ("bench", "cluster", "train_jobs", "serve_app"):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            if folder == "bench" and path.name in ("llamdex_accuracy.py", "privacy_audit.py"):
                continue
            for m in re.finditer(r"eval_set\(\s*[^,()]+,\s*([^,()]+)", text):
                calls += 1
                assert m.group(1).strip() == '"validation"', (path.name, m.group(0))
            assert not re.search(r"splits\.test\b|\.expert_rows\(\s*\"test\"", text), path.name
            for m in re.finditer(r"(\S+)\s*=\s*load_paper_dataset\(", text):
                assert m.group(1) == "_" and "_, train, _ = load_paper_dataset(" in text, (path.name, m.group(0))
    assert calls >= 3  # the encoder ablation, the budget bench and the Expert-API speed bench


def test_parser_reads_lines_and_fills_like_the_paper(toy):
    schema = load_schema(toy)
    reply = "Age: forty-two years\nticket price = 1,234.5\nsex: Female\nnonsense line\nalone: yes"
    parsed = parse_reply(schema, reply)
    assert parsed.row == {"age": 42, "fare": 600.0, "sex": "female", "alone": True}  # fare clipped to range
    assert all(parsed.found.values())
    empty = parse_reply(schema, "The passenger survived.")
    assert empty.row == {"age": 0, "fare": 0.0, "sex": None, "alone": False} and not any(empty.found.values())
    x, read = expert_api_inputs(schema, [reply, "sex: male"])
    assert x.shape == (2, FeatureCodec(schema).m) and read == pytest.approx(5 / 8)
    assert '"name": "fare"' in schema_prompt(schema) and "`name: value`" in schema_prompt(schema)


def test_scorers_return_class_probabilities(lm, toy):
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    questions = ["Age 22, male. Did the passenger survive?", "A woman aged 40. Survived?", "Fare 7.25. Survived?"]
    with torch.no_grad():
        probs, feats, _ = llamdex_scores(model, tok, bundle, questions, batch_size=2)
        base = base_llm_scores(model, tok, answer_tokens(tok, ["no", "yes"]), questions, batch_size=2)
    assert probs.shape == (3, 2) and feats.shape == (3, bundle.codec.m) and base.shape == (3, 2)
    assert np.allclose(probs.sum(1), 1) and np.allclose(base.sum(1), 1)


def test_paper_queries_on_a_shared_prefix_are_plain_greedy_generation(lm, toy):
    """The schema prompt's KV cache is computed once and copied per question; every reply must still be
    exactly what ``model.generate`` writes greedily for that question alone."""
    import copy

    from llamdex.prompting import chat_prompt_ids

    model, tok = copy.deepcopy(lm[0]), lm[1]
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: replies that depend on every token (the fixture's are all "\n")
        for p in model.parameters():
            p.normal_(std=0.5)
    schema = load_schema(toy)
    questions = ["Age 22, male. Did the passenger survive?", "A woman aged 40. Survived?", "Fare 7.25. Survived?"]
    stop = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)]
    ticks = []
    replies = generate_queries(model, tok, schema, questions, max_new_tokens=6,
                               progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    for question, reply in zip(questions, replies, strict=True):
        ids = torch.tensor(chat_prompt_ids(tok, schema_prompt(schema), [question]))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        assert reply == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(set(replies)) == 3, replies



def test_guided_queries_write_one_line_per_field_and_follow_the_cache(lm, toy):
    """Guided replies have every field's line, and the value is the model's own greedy continuation
    (checked against plain no-cache forwards of the growing text)."""
    from llamdex.expert_api import guided_queries
    from llamdex.literals import token_texts
    from llamdex.prompting import chat_prompt_ids

    model, tok, _ = lm
    schema = load_schema(toy)
    question = "A man aged 30, fare 7.25. Survived?"
    lines = guided_queries(model, tok, schema, [question], max_value_tokens=3)[0].split("\n")
    assert [line.partition(":")[0] for line in lines] == [f.name for f in schema.features]
    stop = {i for i, text in enumerate(token_texts(tok)) if "\n" in text} | {tok.eos_token_id}
    ids = chat_prompt_ids(tok, schema_prompt(schema), [question])[0]
    ids = ids + tok(schema.features[0].name + ":", add_special_tokens=False)["input_ids"]
    value: list[int] = []
    with torch.no_grad():
        while len(value) < 3:
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop:
                break
            value.append(token)
            ids = ids + [token]
    assert lines[0] == f"{schema.features[0].name}: " + tok.decode(value, skip_special_tokens=True).strip()


@pytest.mark.parametrize(("reply", "ok"), [
    ("Yes", True), ("No", True), ("Yes.", True), ("No. The passenger died in the sinking.", True),
    ("B (priority).", True), ("A: special priority, a fairly clear case.", True),
    ("Yes, no, no, the documentary", False), ("No or No, which, when added", False), ("Maybe", False),
    ("Yes and then it went on and on and on and on.", False), ("Yes the", False), ("C or D.", False),
])
def test_fluency_check_rejects_noise_after_the_answer(reply, ok):
    assert fluent(reply, ["No", "Yes"] if reply[0] in "NYM" else ["A", "B", "C", "D"]) is ok


def test_chat_replies_start_with_the_predicted_answer(lm, toy):
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    questions = ["Age 30, fare 12. Did the passenger survive?", "A girl of 4. Did the passenger survive?"]
    replies = chat_replies(model, tok, bundle, questions, max_new_tokens=4)
    labels = [r["label"] for r in __import__("llamdex.insertion", fromlist=["x"]).predict_many(
        model, tok, [bundle] * 2, questions)]
    strings = dict(zip(bundle.spec.class_names, bundle.spec.class_token_strings, strict=True))
    assert [r[:1] for r in replies] == [strings[lab] for lab in labels]
