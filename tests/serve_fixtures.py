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


def train_tiny_connectors(resolved, schema: dict, out: Path, seed: int = 0):
    """Real (seconds-long) connector training on the tiny model (a ``ResolvedModel``); saves
    ``out/expert`` (the synthetic expert) and ``out/connectors``. Returns (expert_dir,
    connectors_dir, trained). Runs with one intra-op thread (shared 2-core box)."""
    from cluster.models import load_model
    from llamdex.connectors_io import save_connectors
    from llamdex.expert import save_expert
    from llamdex.pipeline import ConnectorsConfig, train_connectors

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = load_model(resolved)
        cfg = ConnectorsConfig(layer=2, num_slots=4, synthetic_rows=600, train_questions=96, stage2_questions=48,
                               eval_questions=24, enc_epochs=6, dec_epochs=4, dec_lr=3e-3, expert_epochs=3,
                               cache_dtype="float32", enc_width=32, enc_heads=4, enc_head_hidden=16, dec_ffn=16,
                               seed=seed)
        trained = train_connectors(model, tok, schema, model_id=resolved.id, model_hash=resolved.content_hash,
                                   config=cfg)
    finally:
        torch.set_num_threads(threads)
    save_expert(trained.expert, trained.expert_spec, out / "expert")
    save_connectors(trained.encoder, trained.decoder, trained.spec, out / "connectors")
    return out / "expert", out / "connectors", trained


def expert_reference(model_path: Path, expert_dir: Path, connectors_dir: Path, question: str,
                     max_tokens: int) -> tuple[dict, str]:
    """What serving an expert chat must return, computed in-process with llamdex alone: the
    training prompt (connectors' system prompt + question), slots, the class answer token with
    the highest probability at the last slot, then greedy decoding until end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from causal_lm import left_pad
    from llamdex.connectors_io import read_spec
    from llamdex.insertion import load_bundle, prefill_with_experts
    from llamdex.prompting import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    bundle = load_bundle(expert_dir, connectors_dir, read_spec(connectors_dir).base_model_hash)
    ids, mask, pos = left_pad(chat_prompt_ids(tok, bundle.spec.system_prompt, [question]), tok.pad_token_id or 0)
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    with torch.no_grad():
        logits, cache, mask, pos = prefill_with_experts(model, ids, mask, pos, [bundle], tok)
        scores = logits[0, bundle.spec.class_token_ids]
        best = int(scores.argmax())
        prediction = {"label": bundle.spec.class_names[best], "answer": bundle.spec.class_token_strings[best],
                      "probabilities": dict(zip(bundle.spec.class_names, torch.softmax(scores, -1).tolist(),
                                                strict=True))}
        tokens, nxt = [], bundle.spec.class_token_ids[best]
        while nxt not in stop:
            tokens.append(nxt)
            if len(tokens) >= max_tokens:
                break
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=torch.tensor([[nxt]]), attention_mask=mask, position_ids=pos,
                        past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return prediction, tok.decode(tokens, skip_special_tokens=True)
