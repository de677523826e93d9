"""Shared fixtures for the compression tests: a tiny random Llama (built locally, no download)."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_llama():
    """Factory: a fresh tiny random LlamaForCausalLM in eval mode; same seed -> same weights."""

    def build(seed: int = 0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()

    return build
