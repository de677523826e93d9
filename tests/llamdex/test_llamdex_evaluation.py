"""Test-set construction, the baselines' scorers and the Expert-API parser (tiny-random, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.evaluation import accuracy, base_llm_scores, llamdex_scores, make_test_set
from llamdex.expert_api import expert_api_inputs, generate_queries, parse_reply, schema_prompt
from llamdex.prompting import answer_tokens
from llamdex.schema import load_schema
from tests.llamdex.conftest import make_bundle


def test_test_set_uses_heldout_phrasings_and_real_labels(paper_datasets):
    schema, _, test = paper_datasets["titanic"]
    ts = make_test_set(schema, test, max_rows=40, seed=3)
    assert len(ts.questions) == 40 and ts.x.shape == (40, FeatureCodec(schema).m)
    assert set(ts.y) <= {0, 1} and ts.questions[0].rstrip().endswith("?")
    again = make_test_set(schema, test, max_rows=40, seed=3)
    assert again.questions == ts.questions  # deterministic
    assert accuracy(np.eye(2)[ts.y], ts.y) == 1.0


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
        probs, feats = llamdex_scores(model, tok, bundle, questions, batch_size=2)
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
