"""Helpers for the Serve tests: a real app on tiny-random, tenants, and real PEFT adapters."""

from __future__ import annotations

import io
import time
from pathlib import Path

import httpx
import torch

PORT = 18000
BASE_URL = f"http://127.0.0.1:{PORT}"


def make_peft_adapter(model_path: Path, out: Path, seed: int, scale: float = 3.0) -> Path:
    """A real PEFT LoRA (q/v of every layer) for the tiny model, with strong random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)
    return out


def greedy_with_peft(model_path: Path, adapter_dir: Path | None, messages: list[dict], max_tokens: int) -> str:
    """Reference output: transformers (+ peft) greedy generation, for comparison with the server."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def upload_dir(client: httpx.Client, key: str, tenant: str, kind: str, name: str, directory: Path,
               description: str = "") -> httpx.Response:
    files = [("files", (p.name, io.BytesIO(p.read_bytes()), "application/octet-stream"))
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != "README.md"]
    return client.post(f"/v1/tenants/{tenant}/{kind}/{name}", files=files,
                       data={"description": description} if description else None,
                       headers={"Authorization": f"Bearer {key}"}, timeout=120)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s} s")
