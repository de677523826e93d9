"""Fixtures for the vLLM plugin tests: a tiny Llama vLLM's CPU attention accepts, and engines.

vLLM's CPU attention needs head_dim >= 32 (the project's tiny-random has 16), so these tests use
``tiny32``: the same byte-level tokenizer and ChatML template, a 4-layer random Llama with
hidden 64, 2 heads of 32 (1 KV head). Engines run in this process (no engine-core subprocess).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
REPO = Path(__file__).resolve().parents[2]


def declared_entry_point() -> str:
    """The ``vllm.general_plugins`` entry point pyproject.toml declares for the plugin."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return data["project"]["entry-points"]["vllm.general_plugins"]["atelier"]


@pytest.fixture(scope="session", autouse=True)
def plugin_entry_point_installed(tmp_path_factory):
    """Make sure vLLM finds the plugin through its entry point.

    A fresh ``pip install -e .`` (CI) installs the entry point from pyproject.toml. A developer venv
    installed from an older checkout lacks it: then the entry point pyproject.toml declares is
    written into a throw-away ``.dist-info`` on sys.path (and PYTHONPATH, for spawned processes),
    which is what the install would have done.
    """
    from serve_app.vllm_plugin.compat import plugin_entry_point

    if plugin_entry_point() is None:
        site = tmp_path_factory.mktemp("entry-point")
        info = site / "atelier_vllm_plugin_dev-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: atelier-vllm-plugin-dev\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\natelier = {declared_entry_point()}\n")
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    ep = plugin_entry_point()
    assert ep is not None and ep.value == declared_entry_point()
    return ep


def build_tiny32(tokenizer_dir: Path, target: Path) -> Path:
    """A deterministic 4-layer random Llama with head_dim 32 + the tokenizer of ``tokenizer_dir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny32(tiny_model, tmp_path_factory) -> Path:
    return build_tiny32(tiny_model.path, tmp_path_factory.mktemp("tiny32") / "model")


@contextmanager
def vllm_engine(model: Path, **kwargs) -> Iterator:
    """A synchronous vLLM engine on CPU (float32, eager, small KV cache), shut down on exit."""
    from vllm import LLM

    args = dict(model=str(model), dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True,
                kv_cache_memory_bytes=64 << 20, seed=0)
    args.update(kwargs)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
