"""Codebook LoRA tasks: generator, exact split forward, training on tiny-random, PEFT round trip."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import causal_lm
from compression.codebook import forward as lf
from compression.codebook import tasks as lt
from compression.codebook import train as ltr


def test_make_task_is_deterministic_and_seeded():
    a, b = lt.make_task(7), lt.make_task(7)
    assert a == b and a.model_dump() == b.model_dump()
    assert lt.make_task(7, seed=1).facts != a.facts
    assert lt.make_task(8).facts != a.facts
    assert a.name == "codebook-0007" and a.tenant == "lora-t0007"
    with pytest.raises(ValueError):
        lt.make_task(-1)
    with pytest.raises(ValueError):
        lt.make_task(0, num_keys=3)


def test_families_share_question_space_and_answer_vocabulary():
    tasks = [lt.make_task(i) for i in range(12)]
    assert [t.family for t in tasks[:4]] == [f.name for f in lt.FAMILIES]
    for t in tasks:
        fam = lt.FAMILY_BY_NAME[t.family]
        assert t.answer_vocab == list(fam.answers)  # shared across the family's tenants
        assert set(t.facts) <= set(fam.keys) and len(t.facts) == 12
        counts = Counter(t.facts.values())
        assert set(counts) == set(fam.answers) and max(counts.values()) - min(counts.values()) <= 1  # balanced
        assert len(t.train) == 12 * lt.TRAIN_TEMPLATES and len(t.eval) == 12 * len(fam.templates)
        assert all(not ex.heldout for ex in t.train) and {ex.template for ex in t.train} == {0, 1, 2}
        assert {ex.messages[0]["content"] for ex in t.train} <= {ex.messages[0]["content"] for ex in t.eval}
        assert all(t.facts[ex.key] == ex.answer for ex in t.eval)
        assert t.tenant in t.description and all(a in t.description for a in t.answer_vocab)
        assert all(k in t.description for k in t.facts)  # an `auto` router can match the tenant's keys
    # same family, different tenants: same vocabulary and phrasings, different facts
    same = [t for t in tasks if t.family == tasks[0].family]
    assert len({tuple(sorted(t.facts.items())) for t in same}) == len(same)


def _four_grams(template: str) -> set[tuple[str, ...]]:
    import re

    words = re.findall(r"[a-z{}]+", template.lower())
    return {tuple(words[i:i + 4]) for i in range(len(words) - 3)}


def test_train_validation_and_test_phrasings_share_no_four_word_phrase():
    for fam in lt.FAMILIES:
        by_split: dict[str, set] = {"train": set(), "val": set(), "test": set()}
        for i, tpl in enumerate(fam.templates):
            by_split[lt.template_split(i)] |= _four_grams(tpl)
        assert sum(lt.template_split(i) == "test" for i in range(len(fam.templates))) >= 3, fam.name
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not by_split[a] & by_split[b], (fam.name, a, b, by_split[a] & by_split[b])
    task = lt.make_task(5)
    assert {ex.split for ex in task.train} == {"train"}
    assert {ex.split for ex in task.eval} == {"train", "val", "test"}
    assert all(ex.heldout == (ex.split != "train") for ex in task.eval)


@pytest.mark.realmodel
def test_smollm2_answers_are_single_distinct_tokens(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.path)
    for fam in lt.FAMILIES:
        ids = [tok.encode(a, add_special_tokens=False) for a in fam.answers]
        assert all(len(i) == 1 for i in ids), fam.name
        assert len({i[0] for i in ids}) == len(ids)
    ids = causal_lm.chat_ids(tok, lt.make_task(0).train[0].messages)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert causal_lm.end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from cluster.models import load_model

    torch.set_num_threads(1)
    return load_model(tiny_model)


def test_split_and_shared_prefix_forward_are_exact(tiny):
    from peft import get_peft_model

    model, tok = tiny
    task = lt.make_task(2, num_keys=8)
    exs = task.eval[::5]
    cfg = lt.TrainConfig(num_layers=2)
    total = causal_lm.num_layers(model)
    lf.clear_cache()
    pm = get_peft_model(model, ltr.lora_config(cfg, total))
    try:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.05)
        assert lf.first_adapted_layer(pm) == total - 2
        ids = lf.seq_ids(pm, tok, exs)  # prompt + answer token
        assert all(int(i[-1]) == tok.encode(ex.answer)[0] for i, ex in zip(ids, exs, strict=True))
        with torch.no_grad():
            single = torch.cat([pm(input_ids=i[None]).logits[:, -2:] for i in ids])
            for shared in (True, False):
                states = lf.lower_states(pm, tok, exs, total - 2, 4, shared_prefix=shared)
                split = lf.last_logits(pm, tok, exs, total - 2, False, states, shared_prefix=shared)
                assert torch.allclose(split, single, atol=1e-4), shared
            full = lf.last_logits(pm, tok, exs, None, False)
            assert torch.allclose(full, single, atol=1e-4)
    finally:
        pm.unload()
        lf.clear_cache()


def test_train_lora_reduces_loss_and_writes_loadable_peft_dir(tiny, tmp_path):
    from peft import PeftModel

    model, tok = tiny
    names_before = [n for n, _ in model.named_parameters()]
    task = lt.make_task(1, num_keys=8)
    probe = lf.prompt_ids(model, tok, task.eval[:2])[0][None]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    cfg = lt.TrainConfig(num_layers=2, steps=25, lr=1e-2, batch_size=8, rank=4, alpha=8)
    state, adapter_config, metrics = ltr.train_lora(model, tok, task, cfg)

    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["steps"] <= 25 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics) >= {"base_accuracy", "accuracy", "heldout_accuracy", "base_heldout_accuracy",
                            "choice_accuracy", "seconds_total"}
    total = causal_lm.num_layers(model)
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in state}
    assert layers == {total - 2, total - 1}
    assert {k.split(".")[-2] for k in state} == {"lora_A", "lora_B"}
    assert adapter_config["layers_to_transform"] == [total - 2, total - 1]
    # the base model is restored and unchanged
    assert [n for n, _ in model.named_parameters()] == names_before
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, before)

    out = ltr.write_adapter_dir(tmp_path / task.name, state, adapter_config)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(model, str(out))
    try:
        loaded.eval()
        acc = lt.evaluate(loaded, tok, task)
        assert acc == pytest.approx(metrics["accuracy"], abs=1e-6)
        assert lt.evaluate(loaded, tok, task, split_forward=False) == pytest.approx(acc, abs=1e-6)
        assert lt.evaluate_detailed(loaded, tok, task)["heldout_accuracy"] == \
            pytest.approx(metrics["heldout_accuracy"], abs=1e-6)
    finally:
        loaded.unload()
    assert lt.evaluate(model, tok, task) == pytest.approx(metrics["base_accuracy"], abs=1e-6)


def test_batches_share_a_phrasing_and_cover_each_epoch_once():
    templates = [0] * 10 + [1] * 10 + [2] * 10
    gen = ltr._batches(templates, 4, torch.Generator().manual_seed(0))
    for _ in range(2):
        seen = []
        while True:
            idx, ends = next(gen)
            assert len({templates[i] for i in idx}) == 1 and 1 <= len(idx) <= 4
            seen += idx
            if ends:
                break
        assert sorted(seen) == list(range(30))
