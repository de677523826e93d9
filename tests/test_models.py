"""Model catalog: tiny-random determinism, local directories, mismatch detection, the real SmolLM2."""

import json
import shutil

import pytest
import torch

from cluster.models import (
    ModelError,
    build_tiny_random,
    check_model_match,
    load_model,
    resolve_model,
)
from cluster.settings import load_settings


def test_tiny_random_is_deterministic_and_generates(tiny_model, tmp_path):
    again = build_tiny_random(tmp_path / "tiny")
    assert again.content_hash == tiny_model.content_hash and again.num_layers == 4
    lm, tok = load_model(tiny_model)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = lm.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_local_directory_is_hashed_and_cached(tiny_model, tmp_path, settings):
    local = tmp_path / "my-model"
    shutil.copytree(tiny_model.path, local)
    resolved = resolve_model(str(local), settings)
    assert resolved.id == "local:my-model" and resolved.source == "local"
    assert resolved.content_hash == tiny_model.content_hash  # same files → same hash
    assert resolve_model(str(local), settings).content_hash == resolved.content_hash  # cached
    cfg = json.loads((local / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (local / "config.json").write_text(json.dumps(cfg))
    changed = resolve_model(str(local), settings)
    assert changed.content_hash != resolved.content_hash
    with pytest.raises(ModelError, match="base_model: this connectors was built for"):
        check_model_match(resolved.to_record(), changed, what="connectors")
    check_model_match(changed.to_record(), changed)


def test_bad_model_specs_are_explained(tmp_path, settings):
    with pytest.raises(ModelError, match="neither a catalog name"):
        resolve_model("gpt-7", settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        resolve_model(str(tmp_path / "empty"), settings)
    with pytest.raises(ModelError, match="not pulled yet"):
        resolve_model("smollm2-135m", load_settings(home=tmp_path / "nohome"), pull=False)


@pytest.mark.realmodel
def test_embedded_smollm2_converts_and_answers(smollm2):
    assert smollm2.id == "smollm2-135m" and smollm2.num_layers == 30 and smollm2.hidden_size == 576
    lm, tok = load_model(smollm2)
    assert sum(p.numel() for p in lm.parameters()) == pytest.approx(134.5e6, rel=0.01)
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


def test_tiny_random_weights_do_not_depend_on_other_threads(tmp_path):
    """Another thread drawing from torch's global RNG while the model is built (a test session's engine
    threads do) must not change the weights: they come from a private generator."""
    import threading

    import torch

    first = build_tiny_random(tmp_path / "a").content_hash
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.randn(16)

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        second = build_tiny_random(tmp_path / "b").content_hash
    finally:
        stop.set()
        thread.join()
    assert first == second
