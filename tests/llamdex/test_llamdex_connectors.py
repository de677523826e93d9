"""Connectors: encoder/decoder behaviour, connectors.json + safetensors I/O and refusals, answer tokens,
and an end-to-end training smoke run (schema -> questions -> cache -> two stages) on tiny-random."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamdex.codec import FeatureCodec
from llamdex.connectors import Decoder, sharpen
from llamdex.connectors_io import (
    CONNECTORS_JSON,
    CONNECTORS_WEIGHTS,
    ConnectorsError,
    load_connectors,
    save_connectors,
)
from llamdex.coverage import coverage_rows
from llamdex.encoder import Encoder
from llamdex.insertion import Bundle, predict
from llamdex.pipeline import ConnectorsConfig, init_connectors, train_connectors
from llamdex.prompting import answer_tokens
from llamdex.stages import as_distribution, random_expert_outputs
from tests.llamdex.conftest import EXAMPLES

SMALL = dict(enc_width=32, enc_heads=4, enc_head_hidden=16, dec_ffn=16)


@pytest.fixture
def saved(lm, toy, tmp_path):
    model, tok, resolved = lm
    codec = FeatureCodec(toy)
    enc, dec, spec = init_connectors(model, codec, answer_tokens(tok, codec.class_names),
                                     ConnectorsConfig(layer=2, num_slots=4, **SMALL), model_id=resolved.id,
                                     model_hash=resolved.content_hash, scale=3.0)
    save_connectors(enc, dec, spec, tmp_path)
    return enc, dec, spec, tmp_path


def test_encoder_outputs_live_in_codec_space(saved, toy):
    enc, _, _, _ = saved
    enc = Encoder(enc.cfg.model_copy(update={"token_inputs": True, "positions": True, "self_layers": 2,
                                           "copy_literals": False})).eval()
    d = enc.cfg.hidden_size
    h, e, mask = torch.randn(3, 7, d), torch.randn(3, 7, d), torch.ones(3, 7, dtype=torch.bool)
    mask[0, :4] = False
    x = enc.features(h, mask, e)
    codec = FeatureCodec(toy)
    assert x.shape == (3, codec.m) and bool(((x >= 0) & (x <= 1)).all())
    assert bool((x[:, codec.slices["sex"]].sum(1) < 1).all())  # the 'not stated' logit keeps some mass
    target = torch.tensor(codec.encode([{"age": 30, "fare": 10.0, "sex": None, "alone": True}] * 3))
    loss, per_feature = enc.loss(enc(h, mask, e), target)
    assert torch.isfinite(loss) and set(per_feature) == {"age", "fare", "sex", "alone"}
    h2, e2 = h.clone(), e.clone()
    h2[0, :4], e2[0, :4] = 1e3, -1e3  # padded positions are ignored
    torch.testing.assert_close(enc.features(h2, mask, e2), x)
    right = torch.roll(mask[:1], -4, dims=1)  # the same 3 tokens right-padded: same features (positions count tokens)
    torch.testing.assert_close(enc.features(torch.roll(h[:1], -4, 1), right, torch.roll(e[:1], -4, 1)), x[:1],
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="embeds: these connectors read token embeddings"):
        enc.features(h, mask)


def test_decoder_vectors_have_the_configured_scale(saved):
    _, dec, _, _ = saved
    out = dec(torch.rand(5, 1, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (5, 4, dec.cfg.hidden_size)
    rms = out.pow(2).mean(-1).sqrt()  # LayerNorm's eps shrinks low-variance outputs slightly: 1 % tolerance
    torch.testing.assert_close(rms, torch.full_like(rms, 3.0), atol=3e-2, rtol=0)


def test_save_load_round_trip(saved, lm):
    enc, dec, spec, path = saved
    enc2, dec2, spec2 = load_connectors(path, lm[2].content_hash)
    assert spec2.model_dump(exclude={"weights_sha256"}) == spec.model_dump(exclude={"weights_sha256"})
    assert spec2.feature_order == ["age", "fare", "sex", "alone"] and spec2.class_names == ["no", "yes"]
    assert not any(p.requires_grad for p in enc2.parameters())
    for a, b in ((enc, enc2), (dec, dec2)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)
    assert json.loads((path / CONNECTORS_JSON).read_text())["weights_sha256"]


def _rewrite(path, mutate_tensors=None, mutate_json=None):
    tensors = load_file(path / CONNECTORS_WEIGHTS)
    if mutate_tensors:
        mutate_tensors(tensors)
        save_file(tensors, path / CONNECTORS_WEIGHTS)
    spec = json.loads((path / CONNECTORS_JSON).read_text())
    spec["weights_sha256"] = hashlib.sha256((path / CONNECTORS_WEIGHTS).read_bytes()).hexdigest()
    if mutate_json:
        mutate_json(spec)
    (path / CONNECTORS_JSON).write_text(json.dumps(spec))


def test_refuses_another_base_model(saved):
    *_, path = saved
    with pytest.raises(ConnectorsError, match=r"connectors\.json\.base_model_hash: built for 'tiny-random'.*fix: "
                                              r"retrain the connectors"):
        load_connectors(path, "f" * 64)


@pytest.mark.parametrize("case, pattern", [
    ("nan", r"decoder\.w3\.weight\]: not finite"),
    ("shape", r"encoder\.proj\.weight\]: shape \[3, 3\] but connectors\.json implies"),
    ("extra", r"\[bogus\]: unexpected tensor"),
    ("missing", r"decoder\.placeholder\]: missing tensor"),
    ("json", r"connectors\.json\.layer: .*must be < num_layers 4"),
    ("hash", r"SHA-256 differs"),
])
def test_refuses_corrupt_connectors(saved, lm, case, pattern):
    *_, path = saved

    def tensors(t):
        if case == "nan":
            t["decoder.w3.weight"][0, 0] = float("nan")
        elif case == "shape":
            t["encoder.proj.weight"] = torch.zeros(3, 3)
        elif case == "extra":
            t["bogus"] = torch.zeros(1)
        elif case == "missing":
            del t["decoder.placeholder"]

    def spec(s):
        if case == "json":
            s["layer"] = 9
        elif case == "hash":
            s["weights_sha256"] = "0" * 64

    _rewrite(path, tensors, spec)
    with pytest.raises(ConnectorsError, match=pattern):
        load_connectors(path, lm[2].content_hash)


class WordTokenizer:
    """Minimal tokenizer stub: whole words known as single tokens, anything else splits."""

    vocab = {"No": 5, "Yes": 6, "no": 7, "maybe": 8, "A": 1, "B": 2, "C": 3}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[text]] if text in self.vocab else [0, 0]}


def test_answer_tokens_words_then_letters(lm):
    words = answer_tokens(WordTokenizer(), ["no", "yes"])
    assert words.strings == ["No", "Yes"] and words.ids == [5, 6]
    assert words.system_prompt.endswith("only one word: No or Yes.")
    letters = answer_tokens(WordTokenizer(), ["no", "maybe", "very_recom"])
    assert letters.strings == ["A", "B", "C"] and letters.ids == [1, 2, 3]
    assert "A (no), B (maybe) or C (very_recom)" in letters.system_prompt
    tiny = answer_tokens(lm[1], ["no", "yes"])  # byte-level tokenizer: 'No' is two tokens -> letters
    assert tiny.strings == ["A", "B"]


def test_end_to_end_training_smoke_reduces_both_losses(lm, toy, tmp_path):
    model, tok, resolved = lm
    cfg = ConnectorsConfig(layer=2, num_slots=4, synthetic_rows=600, train_questions=96, stage2_questions=48,
                           eval_questions=24, enc_epochs=6, dec_epochs=4, dec_lr=3e-3, expert_epochs=3,
                           cache_dtype="float32", **SMALL)
    reports = []
    trained = train_connectors(model, tok, toy, model_id=resolved.id, model_hash=resolved.content_hash, config=cfg,
                               progress=reports.append)
    assert {r.stage for r in reports} == {"expert", "cache", "encoder", "decoder"}
    rep = trained.spec.training
    assert rep.stage1_losses[-1] < rep.stage1_losses[0] and rep.stage2_losses[-1] < rep.stage2_losses[0]
    assert set(rep.fidelity) == {"age", "fare", "sex", "alone"} and "mae" in rep.fidelity["age"]
    assert 0 <= rep.stage2["end_to_end_accuracy"] <= 1 and rep.seconds["cache"] > 0
    assert rep.config["threads"] == torch.get_num_threads()  # the cost report says how many threads it had
    save_connectors(trained.encoder, trained.decoder, trained.spec, tmp_path)
    enc, dec, spec = load_connectors(tmp_path, resolved.content_hash)
    res = predict(model, tok, Bundle(enc, dec, trained.expert, spec, spec.codec()), "Age 30. Did they survive?")
    assert res["label"] in ("no", "yes")


def test_a_spent_time_budget_cuts_the_cache_but_still_publishes(lm, toy):
    """Past the cache's deadline only the stage-2 / evaluation prompts are cached (the training prompts
    are skipped), and the stages train on what was cached; the connectors still answer."""
    model, tok, resolved = lm
    cfg = ConnectorsConfig(layer=2, num_slots=4, synthetic_rows=600, train_questions=96, stage2_questions=24,
                           eval_questions=12, enc_epochs=6, dec_epochs=4, expert_epochs=1, cache_dtype="float32",
                           time_budget_s=1e-3, **SMALL)
    trained = train_connectors(model, tok, toy, model_id=resolved.id, model_hash=resolved.content_hash, config=cfg)
    rep = trained.spec.training
    assert rep.config["train_prompts"] == cfg.stage2_questions < cfg.train_questions
    assert 1 <= len(rep.stage1_losses) <= cfg.enc_epochs and 1 <= len(rep.stage2_losses) <= cfg.dec_epochs
    overrun = [n for n in rep.notes if n.startswith("time budget overrun")]
    assert len(overrun) == 1 and "floor" in overrun[0]  # the report says the run overran its budget
    res = predict(model, tok, Bundle(trained.encoder, trained.decoder, trained.expert, trained.spec,
                                     trained.spec.codec()), "Age 30. Did they survive?")
    assert res["label"] in ("no", "yes")


def test_coverage_rows_reach_the_range_ends(toy):
    rows = coverage_rows(toy, 400, seed=1)
    assert list(rows.columns) == ["age", "fare", "sex", "alone"]
    assert rows["age"].between(0, 100).all() and (rows["age"] <= 2).sum() > 10  # the lower end is covered
    assert rows["fare"].between(0, 600).all() and (rows["fare"] == rows["fare"].round(0)).sum() > 50
    assert rows["sex"].isna().sum() > 10 and set(rows["sex"].dropna()) == {"male", "female"}
    FeatureCodec(toy).encode(rows)  # valid for the codec


def test_coverage_magnitudes_do_not_give_a_feature_away():
    """Every digit count is common for a wide range (a 5-digit number must not mean 'balance')."""
    from llamdex.schema import load_schema

    schema = load_schema(EXAMPLES / "schemas" / "bank.json")
    rows = coverage_rows(schema, 2000, seed=0)
    balance = schema.feature("balance")
    digits = rows["balance"].abs().astype(int).astype(str).str.len()
    assert rows["balance"].between(balance.lo, balance.hi).all()
    assert all((digits == k).mean() > 0.08 for k in range(1, 6)), digits.value_counts()
    assert (rows["balance"] < 0).mean() > 0.02 and (rows["previous"] == 0).mean() > 0.05
    flat = coverage_rows(schema, 2000, seed=0, log_share=0.0)
    assert (flat["balance"].abs() < 100).mean() < 0.02  # without it, small balances are rare


def test_coverage_rows_draw_the_schemas_default_value(toy):
    """``default_share`` of the numeric values are the schema's typical value (bank: 82 % of real
    clients have no previous contact), which the spreads alone draw at most one time in ten."""
    from llamdex.schema import load_schema

    schema = load_schema(EXAMPLES / "schemas" / "bank.json")
    plain = coverage_rows(schema, 4000, seed=0)
    typical = coverage_rows(schema, 4000, seed=0, default_share=0.2)
    assert (plain["previous"] == 0).mean() < 0.12 and (plain["pdays"] == -1).mean() < 0.05
    for name, default in (("previous", 0), ("pdays", -1), ("campaign", 2), ("age", 39)):
        assert 0.2 < (typical[name] == default).mean() < 0.32, name
    assert typical["balance"].between(schema.feature("balance").lo, schema.feature("balance").hi).all()
    assert typical["housing"].mean() == plain["housing"].mean()  # bools and categories are left alone


def test_random_expert_outputs_cover_the_output_space():
    gen = torch.Generator().manual_seed(0)
    binary = random_expert_outputs(2000, 1, gen)
    assert binary.min() >= 0 and binary.max() <= 1 and 0.2 < float(((binary > 0.3) & (binary < 0.7)).float().mean()) < 0.6
    multi = random_expert_outputs(2000, 4, gen)
    assert torch.allclose(multi.sum(1), torch.ones(2000), atol=1e-5)
    top = multi.max(1).values
    assert float((top > 0.95).float().mean()) > 0.15 and float((top < 0.4).float().mean()) > 0.1
    dist = as_distribution(torch.tensor([[0.25]]))
    assert dist.tolist() == [[0.75, 0.25]]


def test_sharpen_widens_gaps_keeps_the_choice_and_is_what_the_decoder_reads(saved):
    multi = torch.tensor([[0.45, 0.55, 0.0], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(sharpen(multi, 1.0), multi)
    hot = sharpen(multi, 0.25)
    assert torch.equal(hot.argmax(1), multi.argmax(1)) and torch.allclose(hot.sum(1), torch.ones(2))
    assert float(hot[0, 1] - hot[0, 0]) > 0.35  # 0.45 vs 0.55 -> about 0.29 vs 0.71
    binary = torch.tensor([[0.45], [0.5], [0.9]])
    torch.testing.assert_close(sharpen(binary, 0.25)[:, 0],  # the binary form is the two-class one
                               sharpen(torch.cat([1 - binary, binary], 1), 0.25)[:, 1], atol=1e-5, rtol=0)
    _, dec, _, _ = saved
    plain, cold = (Decoder(dec.cfg.model_copy(update={"sharpen": t})) for t in (1.0, 0.25))
    plain.load_state_dict(dec.state_dict())
    cold.load_state_dict(dec.state_dict())
    torch.testing.assert_close(cold(binary), plain(sharpen(binary, 0.25)))
    assert dec.cfg.sharpen == ConnectorsConfig().dec_sharpen  # training's knob reaches the saved decoder
    with pytest.raises(ValueError, match="sharpen"):
        dec.cfg.model_validate(dec.cfg.model_dump() | {"sharpen": 1.5})


def test_a_run_resumed_after_stage_one_answers_like_the_uninterrupted_run(lm, toy, tmp_path):
    """The stage-1 checkpoint (safetensors + JSON) round-trips; a run resumed from it trains no
    encoder, and its connectors give the uninterrupted run's answers; another run's checkpoint is refused."""
    from llamdex.stage_checkpoint import load_encoder_checkpoint, save_encoder_checkpoint

    model, tok, resolved = lm
    cfg = ConnectorsConfig(layer=2, num_slots=4, synthetic_rows=600, train_questions=64, stage2_questions=24,
                           eval_questions=12, enc_epochs=4, dec_epochs=3, expert_epochs=2, cache_dtype="float32",
                           **SMALL)
    kept = []
    first = train_connectors(model, tok, toy, model_id=resolved.id, model_hash=resolved.content_hash, config=cfg,
                             on_encoder=kept.append)
    assert len(kept) == 1 and kept[0].seconds > 0 and kept[0].losses == first.spec.training.stage1_losses
    save_encoder_checkpoint(tmp_path / "ckpt", kept[0], "run-a")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["encoder.safetensors", "stage.json"]
    with pytest.raises(ValueError, match="written by run 'run-a', this run is 'run-b'; fix: start fresh"):
        load_encoder_checkpoint(tmp_path / "ckpt", "run-b")
    assert load_encoder_checkpoint(tmp_path / "empty", "run-a") is None
    resume = load_encoder_checkpoint(tmp_path / "ckpt", "run-a")
    stages = []
    second = train_connectors(model, tok, toy, model_id=resolved.id, model_hash=resolved.content_hash, config=cfg,
                              progress=stages.append, resume=resume, on_encoder=kept.append)
    assert "encoder" not in {r.stage for r in stages} and len(kept) == 1  # stage 1 neither trained nor re-saved
    for key, value in first.encoder.state_dict().items():
        assert torch.equal(value, second.encoder.state_dict()[key]), key
    question = "A 30 year old woman travelling alone paid 20 pounds. Did she survive?"
    answers = [predict(model, tok, Bundle(t.encoder, t.decoder, t.expert, t.spec, t.spec.codec()), question)
               for t in (first, second)]
    assert answers[0]["features"] == answers[1]["features"]
    assert answers[0]["probabilities"] == pytest.approx(answers[1]["probabilities"], abs=1e-4)


def test_publishing_connectors_runs_the_deep_check(saved, tmp_path):
    """Connectors that would not load are refused at publish with an error naming the file and the
    fix (the registry's own format checks already refuse NaN, pickles and bad JSON): weights edited
    after saving (SHA-256), weights of another shape (re-signed), a spec with an unknown field.
    The registry lists nothing new; the good files then publish."""
    from cluster.artifacts import ArtifactError
    from cluster.registry import Registry
    from cluster.validators import install_validators

    install_validators()
    _, _, _, directory = saved
    files = {f: (directory / f).read_bytes() for f in (CONNECTORS_JSON, CONNECTORS_WEIGHTS)}
    spec = json.loads(files[CONNECTORS_JSON])
    registry = Registry(str(tmp_path / "store"))
    registry.create_tenant("acme", "Acme")

    def weights(edit) -> bytes:
        tensors = load_file(directory / CONNECTORS_WEIGHTS)
        name = next(k for k, v in tensors.items() if v.ndim == 2)
        tensors[name] = edit(tensors[name])
        save_file(tensors, tmp_path / "edited.safetensors")
        return (tmp_path / "edited.safetensors").read_bytes()

    def signed(data: bytes) -> bytes:
        return json.dumps({**spec, "weights_sha256": hashlib.sha256(data).hexdigest()}).encode()

    doubled, narrow = weights(lambda w: w * 2), weights(lambda w: w[:, :-1].contiguous())
    cases = [({**files, CONNECTORS_WEIGHTS: doubled}, "SHA-256"),
             ({CONNECTORS_JSON: signed(narrow), CONNECTORS_WEIGHTS: narrow}, "shape"),
             ({**files, CONNECTORS_JSON: json.dumps({**spec, "surprise": 1}).encode()}, "surprise")]
    for bad, needle in cases:
        with pytest.raises(ArtifactError, match=needle) as refused:
            registry.publish("acme", "connectors", "survival", bad)
        assert str(refused.value).startswith("connectors: ") and "fix" in str(refused.value)
    assert registry.list_artifacts("acme", "connectors") == []
    assert registry.publish("acme", "connectors", "survival", files).version == 1
