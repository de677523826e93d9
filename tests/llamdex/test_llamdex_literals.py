"""Literal copy channel: parsing numbers and yes/no words on tokens, value spans of generated questions,
and an encoder that learns to point at (and copy exactly) the right literal."""

from __future__ import annotations

import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.encoder import Encoder, EncoderConfig, FeatureHead, assign_distinct, feature_heads
from llamdex.literals import (
    NO,
    NONE,
    NUMBER,
    ONE,
    YES,
    ZERO,
    LiteralBatch,
    candidates,
    find_literals,
    layout,
    target_mask,
    token_literals,
    value_tokens,
    words_value,
)
from llamdex.prompting import chat_prompt_ids
from llamdex.questions import QuestionGenerator, number_words
from llamdex.schema import load_schema
from llamdex.vocabulary import value_phrases


def test_find_literals_reads_every_number_form_and_yes_no_words():
    text = ("Balance -1,234.5 euros, age forty-two, pdays = -1, chlorides 0.045 g/L, 12.5% vol, "
            "two hundred and five calls; loan: No, default: true. Done at 3.")
    got = [(text[lit.start:lit.end], lit.kind, lit.value) for lit in find_literals(text)]
    assert got == [("-1,234.5", NUMBER, -1234.5), ("forty-two", NUMBER, 42.0), ("-1", NUMBER, -1.0),
                   ("0.045", NUMBER, 0.045), ("12.5", NUMBER, 12.5), ("two hundred and five", NUMBER, 205.0),
                   ("No", ZERO, 0.0), ("true", YES, 1.0), ("3", NUMBER, 3.0)]
    assert find_literals("SO2 x3 nobody yesterday notrue") == []  # digits inside words are not numbers


@pytest.mark.parametrize(("text", "expected"), [
    ("£7.25 paid, or 7.25£", [("£7.25", NUMBER, 7.25), ("7.25", NUMBER, 7.25)]),
    ("a 2k balance, 3 thousand, 1.5 million", [("a", ONE, 1), ("2k", NUMBER, 2000), ("3 thousand", NUMBER, 3000),
                                               ("1.5 million", NUMBER, 1.5e6)]),
    ("twenty two, twenty-first, 21st, third", [("twenty two", NUMBER, 22), ("twenty-first", NUMBER, 21),
                                               ("21st", NUMBER, 21), ("third", NUMBER, 3)]),
    ("no siblings, none, an aunt, twice, a dozen", [("no", ZERO, 0), ("none", ZERO, 0), ("an", ONE, 1),
                                                    ("twice", NUMBER, 2), ("a dozen", NUMBER, 12)]),
    ("not married, doesn't, never, without", [("not", NO, 0), ("n't", NO, 0), ("never", NO, 0), ("without", NO, 0)]),
    ("minus five, -£30, two thousand and five", [("minus five", NUMBER, -5), ("-£30", NUMBER, -30),
                                                  ("two thousand and five", NUMBER, 2005)]),
    ("3,female,22,7.25 and 1,234", [("3", NUMBER, 3), ("22", NUMBER, 22), ("7.25", NUMBER, 7.25),
                                    ("1,234", NUMBER, 1234)]),
])
def test_numbers_as_people_write_them(text, expected):
    assert [(text[x.start:x.end], x.kind, x.value) for x in find_literals(text)] == expected


def test_number_words_round_trip():
    for n in [*range(1000), 1005, 2000, 12345, 999999]:
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
    left, right = layout([lits, short], (), left=True), layout([lits, short], ())
    assert left.kinds.shape == right.kinds.shape == (2, len(ids)) and left.mentions.shape == (2, 0, len(ids))
    assert left.kinds[1, -3:].tolist() == right.kinds[1, :3].tolist() == short.kinds.tolist()
    assert left.kinds[1, :-3].eq(NONE).all() and right.kinds[1, 3:].eq(NONE).all()
    text = "• fare 12 €, alone: no"  # multi-byte characters split over byte-level tokens
    lits = token_literals(tok, tok(text, add_special_tokens=False)["input_ids"])
    assert lits.text == text
    numbers = lits.tokens_in(text.index("12"), text.index("12") + 2, NUMBER)
    assert len(numbers) == 2 and lits.values[numbers].tolist() == [12.0, 12.0]
    assert lits.tokens_in(text.index("no"), len(text), ZERO)


def test_mentions_read_the_schemas_words_longest_first(lm):
    _, tok, _ = lm
    text = "Housing: less proper; form is complete, not incomplete. She travelled 3rd class; no mortgage"
    lits = token_literals(tok, tok(text, add_special_tokens=False)["input_ids"])
    vocabulary = ((("proper",), ("less proper",), ("improper",)), (("complete",), ("incomplete",)),
                  (("male", "he"), ("female", "she")), (("first", "1st"), ("second",), ("third", "3rd")),
                  (("no mortgage",), ("mortgage", "housing loan")))
    mentions = lits.mentions(vocabulary)

    def said(j: int) -> list[tuple[str, int]]:
        runs: dict[int, list[int]] = {}
        for t, k in enumerate(mentions[j].tolist()):
            if k >= 0:
                runs.setdefault(k, []).append(t)
        ends = lits.offsets[1:] + [len(lits.text)]
        return sorted((lits.text[lits.offsets[ts[0]]:ends[ts[-1]]].strip(), k) for k, ts in runs.items())

    assert said(0) == [("less proper", 1)]
    assert said(1) == [("complete", 0), ("incomplete", 1)]
    assert said(2) == [("She", 1)]  # case-insensitive; "he" inside "She" is not a mention
    assert said(3) == [("3rd", 2)]
    assert said(4) == [("no mortgage", 0)]  # the longer phrase wins over "mortgage"


def test_example_schemas_read_what_users_write(lm):
    """The issue's everyday words land on the right value through the schema vocabulary."""
    _, tok, _ = lm
    titanic = load_schema("examples/schemas/titanic.json")
    nursery = load_schema("examples/schemas/nursery.json")
    cases = [(titanic, "pclass", "third", "a woman in 3rd class"), (titanic, "pclass", "third", "class 3"),
             (titanic, "pclass", "first", "travelling upper class"), (titanic, "pclass", "third", "steerage"),
             (titanic, "sex", "female", "a woman"), (titanic, "sex", "male", "the man"),
             (nursery, "form", "incomplete", "a single-parent family"),
             (nursery, "finance", "inconv", "struggling financially"),
             (nursery, "housing", "less_conv", "somewhat cramped housing"), (nursery, "children", "more", "four kids")]
    for schema, name, value, text in cases:
        f = schema.feature(name)
        vocabulary = (tuple(tuple(p) for p in value_phrases(f)),)
        lits = token_literals(tok, tok(text, add_special_tokens=False)["input_ids"])
        found = {k for k in lits.mentions(vocabulary)[0].tolist() if k >= 0}
        assert found == {f.categories.index(value)}, (text, found)


def test_candidates_per_feature_kind():
    kinds = torch.tensor([[NONE, NUMBER, ZERO, ONE, YES, NO]])
    mentions = torch.full((1, 3, 6), -1)
    mentions[0, 2, 0] = 1  # token 0 mentions category 1 of the third feature
    got = candidates(kinds, mentions, ["numeric", "bool", "category"])[0].int().tolist()
    assert got == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_copying_any_target_token_gives_the_written_value(lm, toy, family):
    """Whatever target token the pointer lands on, copying it yields the row's value (numbers from the
    literal or a special-value phrase, bools from yes/no/negation words or the schema's phrases)."""
    from llamdex.codec import FeatureCodec
    from llamdex.encoder import feature_heads
    from llamdex.pipeline import locate_values

    _, tok, _ = lm
    toy["features"][1]["synonyms"] = {"0": ["free"]}
    toy["features"][3]["synonyms"] = {"true": ["on their own"], "false": ["with family"]}
    toy["features"][2]["synonyms"] = {"female": ["woman", "she"], "male": ["man", "he"]}
    schema = load_schema(toy)
    heads = feature_heads(FeatureCodec(schema))
    gen = QuestionGenerator(schema, seed=4)
    rows = [{"age": 7, "fare": 1512.25, "sex": "female", "alone": True},
            {"age": 61, "fare": 0.0, "sex": None, "alone": False}, {"age": 1, "fare": 7.0, "sex": "male",
                                                                   "alone": True}] * 12
    qs = [gen.compose(r, family) for r in rows]
    prompts = chat_prompt_ids(tok, "Answer with one word.", [q.text for q in qs])
    lits, where, _ = locate_values(tok, schema, prompts, qs)
    vocabulary = tuple(tuple(tuple(p) for p in h.phrases) for h in heads)
    for row, q, lit, w in zip(rows, qs, lits, where, strict=True):
        mentions = lit.mentions(vocabulary)
        assert set(w) == set(q.stated)
        for j, h in enumerate(heads):
            if h.name not in q.stated:
                continue
            assert w[h.name], (h.name, q.text)
            for t in w[h.name]:
                k = int(mentions[j, t])
                if h.kind == "numeric":
                    got = h.phrase_values[k] if k >= 0 else float(lit.values[t])
                    assert got == float(row[h.name]), (h.name, t, q.text)
                elif h.kind == "bool":
                    got = bool(k) if k >= 0 else int(lit.kinds[t]) == YES
                    assert got == row[h.name], (h.name, q.text)
                else:
                    assert h.categories[k] == row[h.name], (h.name, q.text)
    with pytest.raises(ValueError, match="question: not found verbatim"):
        value_tokens(lits[0], "a question that is not in the prompt", {"age": [(0, 1)]}, {"age": None})


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
    mentions = torch.full((n, 2, t), -1, dtype=torch.long)
    return hidden, LiteralBatch(kinds, values, mentions), torch.stack([x_true / 100, flag_true], 1).float()


def test_encoder_learns_to_copy_the_marked_literal_exactly(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    heads = [FeatureHead(name="x", kind="numeric", width=1, lo=0, hi=100), FeatureHead(name="flag", kind="bool", width=1)]
    enc = Encoder(EncoderConfig(hidden_size=16, features=heads, width=32, heads=4, layers=1, head_hidden=16,
                                copy_literals=True))
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    for _ in range(300):
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
    assert float(exact.float().mean()) > 0.95  # (every feature may also say 'not stated')


def test_not_stated_gives_the_default_and_mentions_give_their_value(toy):
    toy["features"][0]["default"] = 30
    toy["features"][0]["synonyms"] = {"0": ["newborn"]}
    codec = FeatureCodec(toy)
    enc = Encoder(EncoderConfig(hidden_size=8, features=feature_heads(codec), width=16, heads=2, head_hidden=8,
                                copy_literals=True)).eval()
    hidden, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    nothing = torch.full((2, 4, 5), -1)
    kinds = torch.zeros(2, 5, dtype=torch.long)
    kinds[:, 1] = NUMBER
    lits = LiteralBatch(kinds, torch.full((2, 5), 45.0, dtype=torch.float64), nothing)
    with torch.no_grad():
        raw = enc(hidden, mask, literals=lits)
        raw.pointer_logits[:, :, -1] = 1e3  # every feature: "not stated"
        unstated = enc.activate(raw)
        assert enc.stated(raw).tolist() == [[False] * 4] * 2
        raw.pointer_logits[:, 0, 1] = 1e4  # age copies "45"
        copied = enc.activate(raw)
    assert torch.allclose(unstated[:, 0], torch.full((2,), 0.3)) and unstated[:, codec.slices["sex"]].eq(0).all()
    assert unstated[:, codec.slices["alone"]].eq(0).all()  # bool default: false
    assert torch.allclose(copied[:, 0], torch.full((2,), 0.45))
    said = nothing.clone()
    said[:, 2, 3] = 1  # token 3 mentions "female"
    said[:, 0, 4] = 0  # token 4 mentions age's "newborn" (= 0)
    with torch.no_grad():
        raw = enc(hidden, mask, literals=LiteralBatch(kinds, lits.values, said))
        raw.pointer_logits[:, 2, 3] = 1e3
        raw.pointer_logits[:, 0, 4] = 1e3
        out = enc.activate(raw)
    assert out[:, codec.slices["sex"]].tolist() == [[0.0, 1.0], [0.0, 1.0]] and out[:, 0].tolist() == [0.0, 0.0]
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
    lits = LiteralBatch(kinds, values, torch.full((1, 2, 5), -1, dtype=torch.long))
    with torch.no_grad():
        raw = enc(torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool), literals=lits)
        raw.pointer_logits[:] = torch.tensor([[[-1e4, 3.0, 3.0, -1e4, 0.0, -1e4],    # a: "12" (p ~ 0.97)
                                               [-1e4, 2.0, 0.0, -1e4, 1.5, -1e4]]])  # b: "12" (0.6) then "7"
        got = enc.activate(raw)
    assert torch.allclose(got, torch.tensor([[0.12, 0.07]], dtype=got.dtype))  # b falls back to "7"
    assert raw.pointer_logits.argmax(-1).tolist() == [[1, 1]]  # independently, both would copy "12"


def test_features_leaning_on_one_literal_get_the_jointly_most_probable_literals():
    """a says "6" (0.55) or "1" (0.44); b says "6" (0.5), barely "15": greedy would give a "6" and send b
    to "15"; the most probable joint reading is a = 1, b = 6."""
    heads = [FeatureHead(name=n, kind="numeric", width=1, lo=0, hi=100) for n in ("a", "b")]
    enc = Encoder(EncoderConfig(hidden_size=8, features=heads, width=16, heads=2, head_hidden=8,
                                copy_literals=True)).eval()
    kinds = torch.tensor([[NONE, NUMBER, NONE, NUMBER, NONE, NUMBER]])
    values = torch.tensor([[0.0, 1.0, 0.0, 6.0, 0.0, 15.0]], dtype=torch.float64)
    lits = LiteralBatch(kinds, values, torch.full((1, 2, 6), -1, dtype=torch.long))
    p = torch.tensor([[[0, 0.44, 0, 0.55, 0, 0.01, 0], [0, 0.005, 0, 0.5, 0, 0.03, 0.465]]])
    with torch.no_grad():
        raw = enc(torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool), literals=lits)
        raw.pointer_logits[:] = torch.log(p.clamp_min(1e-9))
        got = enc.activate(raw)
    assert torch.allclose(got, torch.tensor([[0.01, 0.06]], dtype=got.dtype))
    assert assign_distinct(torch.tensor([[0.44, 0.55, 0.01], [0.005, 0.5, 0.03]])) == {0: 0, 1: 1}
    assert assign_distinct(torch.tensor([[0.005, 0.004]])) == {}  # nothing above the floor: keep own choice
