"""Random (untrained) Llamdex connectors + experts for the tiny32 model, saved as a tenant would
publish them, and the torch reference a vLLM expert request must equal."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.llamdex.conftest import TOY  # the brief's example schema, shared with the llamdex tests


def save_random_expert(model_dir: Path, out: Path, layer: int, num_slots: int, seed: int) -> tuple[Path, Path]:
    """Connectors (layer k, n slots, random weights at a visible scale) + a random expert, saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.models import hash_model_dir
    from llamdex.codec import FeatureCodec
    from llamdex.connectors_io import save_connectors
    from llamdex.expert import build_expert, save_expert
    from llamdex.expert_spec import DPLedger, ExpertArch, ExpertSpec
    from llamdex.pipeline import ConnectorsConfig, init_connectors
    from llamdex.prompting import answer_tokens

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    codec = FeatureCodec(TOY)
    cfg = ConnectorsConfig(layer=layer, num_slots=num_slots, enc_width=32, enc_heads=4, enc_head_hidden=16,
                           dec_ffn=16, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder, decoder, spec = init_connectors(model, codec, answer_tokens(tok, codec.class_names), cfg,
                                                 model_id="tiny32", model_hash=hash_model_dir(model_dir), scale=0.5)
        arch = ExpertArch.from_schema(TOY, hidden_sizes=(16,))
        expert = build_expert(arch).eval()
    ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0, sample_rate=1, steps=0, epochs=0,
                      accountant="none")
    save_connectors(encoder, decoder, spec, out / "connectors")
    save_expert(expert, ExpertSpec.build(TOY, arch, ledger), out / "expert")
    return out / "expert", out / "connectors"


@torch.no_grad()
def torch_expert_reference(model, tok, bundle, question: str, max_tokens: int) -> tuple[dict, list[int]]:
    """llamdex's own answer: ``predict`` (label, probabilities, encoded features) and the generation
    the torch engine serves (class answer token first, then greedy on the KV cache, no stop)."""
    from causal_lm import left_pad
    from llamdex.insertion import predict, prefill_with_experts
    from llamdex.prompting import chat_prompt_ids

    pred = predict(model, tok, bundle, question)
    ids, mask, pos = left_pad(chat_prompt_ids(tok, bundle.spec.system_prompt, [question]), tok.pad_token_id or 0)
    logits, cache, mask, pos = prefill_with_experts(model, ids, mask, pos, [bundle], tok)
    class_ids = bundle.spec.class_token_ids
    tokens = [class_ids[int(logits[0, class_ids].argmax())]]
    while len(tokens) < max_tokens:
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return pred, tokens
