"""Insertion runtime and the slot-only stage-2 forward on the tiny-random Llama (exactness tests)."""

from __future__ import annotations

import pytest
import torch

from causal_lm import backbone, left_pad
from llamdex.connectors_io import save_connectors
from llamdex.expert import ExpertArch, ExpertError, ExpertSpec, build_expert, save_expert
from llamdex.expert_spec import DPLedger
from llamdex.hidden_cache import AnswerInputs, build_cache
from llamdex.insertion import Bundle, greedy_decode, load_bundle, predict, predict_many, prefill_with_experts
from llamdex.literals import layout, token_literals
from llamdex.llm_ops import overwrite_at_layer
from llamdex.prompting import chat_prompt_ids
from llamdex.stages import slot_class_logits
from tests.llamdex.conftest import make_bundle

QUESTIONS = ["Age 22, fare 7.25, male. Did the passenger survive?",
             "She is forty, travelling alone with a ticket price of 80 pounds. Survived?",
             "Sex: female. Did the passenger survive?"]
ATOL = 1e-5


def batch(tok, bundle: Bundle, questions: list[str]):
    return left_pad(chat_prompt_ids(tok, bundle.spec.system_prompt, questions), tok.pad_token_id)


@torch.no_grad()
def full_forward_with_slots(model, ids: list[int], slots: torch.Tensor, placeholder: torch.Tensor, layer: int,
                            after: list[int] = ()):
    """Reference: one plain HF forward over [prompt ; slots ; after] with the slots overwritten at ``layer``."""
    t, n = len(ids), slots.shape[0]
    embed = backbone(model).embed_tokens
    embeds = torch.cat([embed(torch.tensor(ids)), placeholder, embed(torch.tensor(list(after), dtype=torch.long))])[None]

    def put(h):
        h = h.clone()
        h[0, t:t + n] = slots
        return h

    with overwrite_at_layer(model, layer, put):
        return model(inputs_embeds=embeds).logits[0, -1]


@pytest.mark.parametrize("layer", [0, 2])
def test_slot_only_forward_equals_full_forward(lm, toy, layer):
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer, n=4)
    prompts = chat_prompt_ids(tok, bundle.spec.system_prompt, QUESTIONS)
    cache = build_cache(model, prompts, [layer], tok.pad_token_id, kv_from=layer, kv_rows=range(3),
                        dtype=torch.float32, batch_size=2)
    slots = torch.randn(3, 4, model.config.hidden_size) * 0.05
    vocab = list(range(model.config.vocab_size))
    with torch.no_grad():
        fast, _ = slot_class_logits(model, cache, layer, slots, [0, 1, 2], vocab)
    for i, ids in enumerate(prompts):
        ref = full_forward_with_slots(model, ids, slots[i], bundle.decoder.placeholder, layer)
        torch.testing.assert_close(fast[i], ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 2])
def test_what_follows_the_answer_is_computed_exactly(lm, toy, layer):
    """Stage 2's end-of-turn objective sees exactly what serving computes after the forced answer token:
    the cached answer-token state + the slot-only forward = one plain forward over [prompt ; slots ;
    answer], and what follows the answer depends on the slots (so the decoder can train it)."""
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer, n=4)
    prompts = chat_prompt_ids(tok, bundle.spec.system_prompt, QUESTIONS)
    answer_ids = bundle.spec.class_token_ids
    cache = build_cache(model, prompts, [layer], tok.pad_token_id, kv_from=layer, kv_rows=range(3),
                        dtype=torch.float32, batch_size=2,
                        answers=AnswerInputs(bundle.decoder.placeholder, answer_ids))
    assert cache.answers[0].shape == (len(answer_ids), model.config.hidden_size)
    slots = torch.randn(3, 4, model.config.hidden_size) * 0.05
    for c, token in enumerate(answer_ids):
        answer = torch.stack([cache.answers[i][c] for i in range(3)])
        with torch.no_grad():
            _, after = slot_class_logits(model, cache, layer, slots, [0, 1, 2], answer_ids, answer)
            _, moved = slot_class_logits(model, cache, layer, slots * 3, [0, 1, 2], answer_ids, answer)
        for i, ids in enumerate(prompts):
            ref = full_forward_with_slots(model, ids, slots[i], bundle.decoder.placeholder, layer, [token])
            torch.testing.assert_close(after[i], ref, atol=ATOL, rtol=1e-4)
        assert not torch.allclose(after, moved)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_cached_hidden_states_are_what_the_encoder_sees(lm, toy, shared_prefix):
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    prompts = chat_prompt_ids(tok, bundle.spec.system_prompt, QUESTIONS)
    if not shared_prefix:  # no common prefix: every prompt runs in full
        prompts = [[100 + i] + p for i, p in enumerate(prompts)]
    cache = build_cache(model, prompts, [0, 2], tok.pad_token_id, kv_from=2, kv_rows=[1], dtype=torch.float32)
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[2]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(cache.hidden[2][i], hs[i, -len(p):], atol=ATOL, rtol=1e-4)
    assert list(cache.keys) == [1] and cache.keys[1].shape[2] == len(prompts[1])


def test_mixed_batch_equals_single_rows_and_plain_rows(lm, toy):
    model, tok, _ = lm
    a, b = make_bundle(lm, toy, layer=1, n=3, seed=1), make_bundle(lm, toy, layer=3, n=5, seed=2)
    experts = [a, None, b]
    ids, mask, pos = batch(tok, a, QUESTIONS)
    with torch.no_grad():
        logits, cache, mask2, pos2 = prefill_with_experts(model, ids, mask, pos, experts, tok)
        steps = greedy_decode(model, logits, cache, mask2, pos2, 4)
        for i, bundle in enumerate(experts):
            one = batch(tok, a, [QUESTIONS[i]])
            l1, c1, m1, p1 = prefill_with_experts(model, *one, [bundle], tok)
            torch.testing.assert_close(logits[i], l1[0], atol=ATOL, rtol=1e-4)
            assert steps[i].tolist() == greedy_decode(model, l1, c1, m1, p1, 4)[0].tolist()
            if bundle is None:  # a row without expert is exactly the plain model
                plain = model(input_ids=one[0]).logits[0, -1]
                torch.testing.assert_close(logits[i], plain, atol=ATOL, rtol=1e-4)
                gen = model.generate(one[0], attention_mask=one[1], max_new_tokens=4, do_sample=False,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id)
                assert steps[i].tolist() == gen[0, one[0].shape[1]:].tolist()
    assert mask2.shape[1] == ids.shape[1] + 5 and int(mask2[1].sum()) == int(mask[1].sum())


def test_decoding_after_slots_matches_uncached_recompute(lm, toy):
    """KV-cached continuation after the slots = recomputing [prompt ; slots ; generated] from scratch."""
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    ids, mask, pos = batch(tok, bundle, QUESTIONS[:1])
    with torch.no_grad():
        out = greedy_decode(model, *prefill_with_experts(model, ids, mask, pos, [bundle], tok), 3)[0].tolist()
        t = ids.shape[1]
        slots, _, _ = bundle.slots(model(input_ids=ids, output_hidden_states=True).hidden_states[2], mask,
                                backbone(model).embed_tokens(ids),
                                layout([token_literals(tok, ids[0].tolist())], bundle.encoder.cfg.vocabulary))
        emb = backbone(model).embed_tokens
        generated: list[int] = []
        for _ in range(3):
            extra = emb(torch.tensor(generated, dtype=torch.long))
            embeds = torch.cat([emb(ids[0]), bundle.decoder.placeholder, extra])[None]

            def put(h):
                h = h.clone()
                h[0, t:t + 3] = slots[0]
                return h

            with overwrite_at_layer(model, 2, put):
                generated.append(int(model(inputs_embeds=embeds).logits[0, -1].argmax()))
    assert out == generated


def test_predict_is_one_forward_with_readable_outputs(lm, toy):
    model, tok, _ = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    res = predict(model, tok, bundle, QUESTIONS[0])
    assert res["label"] in ("no", "yes")
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(res["expert_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(res["features"]) == {"age", "fare", "sex", "alone"}
    assert sorted(res["stated"] + res["not_stated"]) == sorted(res["features"])
    assert all(res["features"][k] is None for k in res["not_stated"])
    assert all(res["features"][k] is not None for k in res["stated"] if k != "sex")
    ids, mask, pos = batch(tok, bundle, QUESTIONS[:1])
    with torch.no_grad():
        logits = prefill_with_experts(model, ids, mask, pos, [bundle], tok)[0][0, bundle.spec.class_token_ids]
    assert torch.softmax(logits, -1).tolist() == pytest.approx(list(res["probabilities"].values()), abs=1e-5)


def test_bundle_swaps_expert_and_loads_from_disk(lm, toy, tmp_path):
    model, tok, resolved = lm
    bundle = make_bundle(lm, toy, layer=2, n=3)
    real = build_expert(ExpertArch.from_schema(toy, hidden_sizes=(8, 8)))
    ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0.0, sample_rate=0.1, steps=1, epochs=1,
                      accountant="none")
    save_expert(real, ExpertSpec.build(toy, real.arch, ledger), tmp_path / "expert")
    save_connectors(bundle.encoder, bundle.decoder, bundle.spec, tmp_path / "conn")
    loaded = load_bundle(tmp_path / "expert", tmp_path / "conn", resolved.content_hash)
    swapped = bundle.with_expert(real)
    got, want = predict(model, tok, loaded, QUESTIONS[1]), predict(model, tok, swapped, QUESTIONS[1])
    assert got["probabilities"] == pytest.approx(want["probabilities"]) and got["features"] == want["features"]
    wrong = build_expert(ExpertArch(input_size=3, output_size=1, hidden_sizes=[4]))
    with pytest.raises(ExpertError, match="input_size: 3 but the connectors expect 5"):
        bundle.with_expert(wrong)


def test_predict_many_mixes_bundles_and_equals_single_predictions(lm, toy):
    model, tok, _ = lm
    a, b = make_bundle(lm, toy, layer=1, n=3, seed=1), make_bundle(lm, toy, layer=2, n=5, seed=2)
    bundles = [a, b, a]
    together = predict_many(model, tok, bundles, QUESTIONS)
    for bundle, question, got in zip(bundles, QUESTIONS, together, strict=True):
        alone = predict(model, tok, bundle, question)
        assert got["label"] == alone["label"] and got["features"] == alone["features"]
        assert list(got["probabilities"].values()) == pytest.approx(list(alone["probabilities"].values()), abs=1e-5)
    with pytest.raises(ValueError, match="bundles: 2 entries for 3 questions"):
        predict_many(model, tok, [a, b], QUESTIONS)
