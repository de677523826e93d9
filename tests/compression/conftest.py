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


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run the compression tests on one intra-op thread (restored after each test module).

    The fits are many tiny matmuls; on a small shared CI box, torch's thread pool spends more
    time synchronising than computing, and oversubscription makes timings erratic.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
