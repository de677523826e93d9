"""Fixtures for the engine tests (no Ray): a tiny Llama whose greedy output depends on the prompt.

The session's ``tiny-random`` model has near-uniform logits (greedy decoding repeats one token
whatever the prompt), which would let a wrong engine pass. ``lively`` is the same architecture with
its weights scaled up (deterministically), saved once per session, so outputs differ per prompt,
per adapter and per position — a KV or mask mistake changes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def lively(tiny_model, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lively")
    model = AutoModelForCausalLM.from_pretrained(tiny_model.path)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.35 if p.dim() > 1 else 0.1))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model.path).save_pretrained(out)
    return out


def load(path: Path, dtype: torch.dtype = torch.float32):
    """A fresh (model, tokenizer) from ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def reference(path_or_model, tok, messages: list[dict], max_tokens: int, stop_ids: set[int] | None = None) -> str:
    """transformers greedy generation of one chat (the per-row reference), stopping at end of turn."""
    from transformers import AutoModelForCausalLM

    model = path_or_model if not isinstance(path_or_model, Path) else AutoModelForCausalLM.from_pretrained(path_or_model)
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(stop_ids) if stop_ids else None)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    if stop_ids:
        ids = [i for i in ids if i not in stop_ids]
    return tok.decode(ids, skip_special_tokens=True)
