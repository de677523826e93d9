"""Literal copy channel: parsing numbers and yes/no words on tokens, value spans of generated questions,
and an encoder that learns to point at (and copy exactly) the right literal."""

from __future__ import annotations

import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.encoder import Encoder, EncoderConfig, FeatureHead, feature_heads
from llamdex.literals import (
    NO,
    NONE,
    NUMBER,
    YES,
    LiteralBatch,
    find_literals,
    layout,
    target_mask,
    token_literals,
    value_tokens,
    words_value,
)
from llamdex.prompting import chat_prompt_ids
from llamdex.questions import QuestionGenerator, number_words


def test_find_literals_reads_every_number_form_and_yes_no_words():
    text = ("Balance -1,234.5 euros, age forty-two, pdays = -1, chlorides 0.045 g/L, 12.5% vol, "
            "two hundred and five calls; loan: No, default: true. Done at 3.")
    got = [(text[lit.start:lit.end], lit.kind, lit.value) for lit in find_literals(text)]
    assert got == [("-1,234.5", NUMBER, -1234.5), ("forty-two", NUMBER, 42.0), ("-1", NUMBER, -1.0),
                   ("0.045", NUMBER, 0.045), ("12.5", NUMBER, 12.5), ("two hundred and five", NUMBER, 205.0),
                   ("No", NO, 0.0), ("true", YES, 1.0), ("3", NUMBER, 3.0)]
    assert find_literals("SO2 x3 1st nobody yesterday notrue") == []  # digits inside words are not numbers


def test_number_words_round_trip():
    for n in range(1000):
        assert words_value(number_words(n)) == n
        [lit] = find_literals(f"it was {number_words(n)} in all")
        assert lit.value == n


def test_token_literals_tag_the_tokens_of_each_literal(lm):
    _, tok, _ = lm
    ids = tok("fare 1,234.5 pounds, alone: yes", add_special_tokens=False)["input_ids"]
    lits = token_literals(tok, ids)
    assert lits.text == "fare 1,234.5 pounds, alone: yes"
    tagged = "".join(tok.decode([i]) for i, k in zip(ids, lits.kinds.tolist(), strict=True) if k == NUMBER)
    assert tagged == "1,234.5" and set(lits.values[lits.kinds == NUMBER].tolist()) == {1234.5}
    assert int(lits.kinds[-1]) == YES and int(lits.kinds[0]) == NONE
    short = token_literals(tok, ids[:3])
    left, right = layout([lits, short], [], left=True), layout([lits, short], [])
    assert left.kinds.shape == right.kinds.shape == (2, len(ids)) and left.mentions.shape == (2, 0, len(ids))
    assert left.kinds[1, -3:].tolist() == right.kinds[1, :3].tolist() == short.kinds.tolist()
    assert left.kinds[1, :-3].eq(NONE).all() and right.kinds[1, 3:].eq(NONE).all()
    text = "• fare 12 €, alone: no"  # multi-byte characters split over byte-level tokens
    lits = token_literals(tok, tok(text, add_special_tokens=False)["input_ids"])
    assert lits.text == text
    numbers = lits.tokens_in(text.index("12"), text.index("12") + 2, NUMBER)
    assert len(numbers) == 2 and lits.values[numbers].tolist() == [12.0, 12.0]
    assert lits.tokens_in(text.index("no"), len(text), NO)


def test_category_mentions_are_whole_words_longest_first(lm):
    _, tok, _ = lm
    text = "Housing: less proper; form is complete, not incomplete. Sex: female"
    lits = token_literals(tok, tok(text, add_special_tokens=False)["input_ids"])
    mentions = lits.mentions([["proper", "less_proper", "improper"], ["complete", "incomplete"], ["male", "female"]])

    def said(j: int) -> list[tuple[str, int]]:
        runs: dict[int, list[int]] = {}
        for t, k in enumerate(mentions[j].tolist()):
            if k >= 0:
                runs.setdefault(k, []).append(t)
        ends = lits.offsets[1:] + [len(lits.text)]
        return sorted((lits.text[lits.offsets[ts[0]]:ends[ts[-1]]], k) for k, ts in runs.items())

    assert said(0) == [("less proper", 1)]
    assert said(1) == [("complete", 0), ("incomplete", 1)]
    assert said(2) == [("female", 1)]  # "male" inside "female" is not a mention


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_value_tokens_point_at_each_features_written_value(lm, toy, family):
    _, tok, _ = lm
    gen = QuestionGenerator(toy, seed=4)
    rows = [{"age": 7, "fare": 1512.25, "sex": "female", "alone": True},
            {"age": 61, "fare": 7.0, "sex": None, "alone": False}] * 10
    kinds = {"age": (NUMBER,), "fare": (NUMBER,), "alone": (YES, NO)}
    for row in rows:
        q = gen.compose(row, family)
        if row["sex"]:
            assert q.text[slice(*q.spans["sex"])].lower() == row["sex"]
        else:
            assert "sex" not in q.spans
        prompt = chat_prompt_ids(tok, "Answer with one word.", [q.text])[0]
        lits = token_literals(tok, prompt)
        where = value_tokens(lits, q.text, q.spans, kinds)
        for name in ("age", "fare"):
            assert where[name] and {float(lits.values[t]) for t in where[name]} == {float(row[name])}
        assert {int(lits.kinds[t]) for t in where["alone"]} == {YES if row["alone"] else NO}
    with pytest.raises(ValueError, match="question: not found verbatim"):
        value_tokens(lits, "a question that is not in the prompt", q.spans, kinds)


def _copy_task(n: int, gen: torch.Generator, d: int = 16, t: int = 14):
    """Random memories with 3 numbers and 2 yes/no words; the target literal of feature 'x' is
    marked by +3 on hidden dim 0, that of 'flag' by +3 on dim 1 (what a layer-k state would say)."""
    hidden = torch.randn(n, t, d, generator=gen)
    kinds = torch.zeros(n, t, dtype=torch.long)
    values = torch.zeros(n, t, dtype=torch.float64)
    x_true, flag_true = torch.zeros(n), torch.zeros(n)
    for r in range(n):
        pos = torch.randperm(t, generator=gen)[:5].tolist()
        for p in pos[:3]:
            kinds[r, p], values[r, p] = NUMBER, float(torch.randint(0, 101, (1,), generator=gen))
        for p in pos[3:]:
            kinds[r, p] = YES if bool(torch.rand(1, generator=gen) < 0.5) else NO
        hidden[r, pos[0], 0] += 3.0
        hidden[r, pos[3], 1] += 3.0
        x_true[r], flag_true[r] = values[r, pos[0]], float(kinds[r, pos[3]] == YES)
    mentions = torch.zeros(n, 0, t, dtype=torch.long)
    return hidden, LiteralBatch(kinds, values, mentions), torch.stack([x_true / 100, flag_true], 1).float()


def test_encoder_learns_to_copy_the_marked_literal_exactly(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    heads = [FeatureHead(name="x", kind="numeric", width=1, lo=0, hi=100), FeatureHead(name="flag", kind="bool", width=1)]
    enc = Encoder(EncoderConfig(hidden_size=16, features=heads, width=32, heads=4, layers=1, head_hidden=16,
                                copy_literals=True))
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(250):
        hidden, lits, target = _copy_task(64, gen)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
        raw = enc(hidden, mask, literals=lits)
        marked = torch.stack([hidden[..., 0] > 1.5, hidden[..., 1] > 1.5], 1)
        loss, parts = enc.loss(raw, target, pointer_targets=torch.cat([marked, torch.zeros_like(marked[..., :1])], -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"x", "flag", "x@copy", "flag@copy"}
    hidden, lits, target = _copy_task(200, gen)
    with torch.no_grad():
        got = enc.features(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), literals=lits)
    exact = torch.isclose(got, target, rtol=0, atol=1e-6).all(1)  # copied exactly, not approximated
    assert float(exact.float().mean()) > 0.97


def test_copy_falls_back_to_the_regression_head_without_literals(toy):
    codec = FeatureCodec(toy)
    enc = Encoder(EncoderConfig(hidden_size=8, features=feature_heads(codec), width=16, heads=2, head_hidden=8,
                                copy_literals=True)).eval()
    hidden, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    nothing = torch.full((2, 1, 5), -1)
    none = LiteralBatch(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.float64), nothing)
    kinds = none.kinds.clone()
    kinds[:, 1] = NUMBER
    one = LiteralBatch(kinds, torch.full((2, 5), 30.0, dtype=torch.float64), nothing)
    with torch.no_grad():
        fallback, copied = enc.features(hidden, mask, literals=none), enc.features(hidden, mask, literals=one)
        heads = torch.sigmoid(enc(hidden, mask, literals=none).heads[0])[:, 0]
    assert torch.allclose(fallback[:, 0], heads)  # age from the regression head
    assert torch.allclose(copied[:, 0], torch.full((2,), 0.3)) and torch.allclose(copied[:, 1], torch.full((2,), 0.05))
    sex = codec.slices["sex"]
    assert copied[:, sex].eq(0).all()  # no mention of a category: "not stated" (all zeros)
    said = nothing.clone()
    said[:, 0, 3] = 1  # token 3 mentions "female"
    with torch.no_grad():
        raw = enc(hidden, mask, literals=LiteralBatch(kinds, one.values, said))
        raw.pointer_logits[:, 2, 3] = 1e3  # the pointer picks that mention
        assert enc.activate(raw)[:, sex].tolist() == [[0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="literals: these connectors copy values"):
        enc.features(hidden, mask)
    assert target_mask([{"age": [1]}, {}], ["age", "fare"], 5).sum() == 1
    absent = target_mask([{"age": [1]}, {}], ["age", "sex"], 5, frozenset({"sex"}))
    assert absent[:, 1, 5].tolist() == [True, True] and absent[0, 0, 1] and not absent[1, 0].any()


def test_one_literal_per_feature_the_more_confident_keeps_it():
    heads = [FeatureHead(name=n, kind="numeric", width=1, lo=0, hi=100) for n in ("a", "b")]
    enc = Encoder(EncoderConfig(hidden_size=8, features=heads, width=16, heads=2, head_hidden=8,
                                copy_literals=True)).eval()
    kinds = torch.tensor([[NONE, NUMBER, NUMBER, NONE, NUMBER]])  # "12" on tokens 1-2, "7" on token 4
    values = torch.tensor([[0.0, 12.0, 12.0, 0.0, 7.0]], dtype=torch.float64)
    lits = LiteralBatch(kinds, values, torch.zeros(1, 0, 5, dtype=torch.long))
    with torch.no_grad():
        raw = enc(torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool), literals=lits)
        raw.pointer_logits[:] = torch.tensor([[[-1e4, 3.0, 3.0, -1e4, 0.0, -1e4],    # a: "12" (p ~ 0.97)
                                               [-1e4, 2.0, 0.0, -1e4, 1.5, -1e4]]])  # b: "12" (0.6) then "7"
        got = enc.activate(raw)
    assert torch.allclose(got, torch.tensor([[0.12, 0.07]], dtype=got.dtype))  # b falls back to "7"
    assert raw.pointer_logits.argmax(-1).tolist() == [[1, 1]]  # independently, both would copy "12"
