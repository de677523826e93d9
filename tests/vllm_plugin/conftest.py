"""Fixtures for the vLLM plugin tests: a tiny Llama vLLM's CPU attention accepts, and engines.

vLLM's CPU attention needs head_dim >= 32 (the project's tiny-random has 16), so these tests use
``tiny32``: the same byte-level tokenizer and ChatML template, a 4-layer random Llama with
hidden 64, 2 heads of 32 (1 KV head), weights scaled up so greedy outputs depend on the input. Engines run in this process (no engine-core subprocess).
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
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "lively" weights (as tests/serve_app): outputs depend on prompt, adapter, slots
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.35 if p.dim() > 1 else 0.1))
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


# ------------------------------------------------------------------------------------ shared cases
PROMPTS = ["hello world", "the cat sat on", "abc abc abc", "1 2 3 4", "Once upon a time", "zzz", "Paris is"]
LAYOUT = [0, None, 1, 2, None, 3, None]  # adapter index per prompt (None: base model)
MAX_TOKENS = 6
QUESTIONS = ["A 30 year old man travelling alone paid 12.5 pounds for his ticket. Did he survive?",
             "She was 61, travelled with her family and her fare was 80 pounds. Did she survive?",
             "Did the 8 year old girl survive?"]


def token_prompts(model_dir: Path) -> list:
    """PROMPTS as vLLM TokensPrompts of the ids the pool's engines use (serve_app.replica.rows.encode_prompt)."""
    from transformers import AutoTokenizer
    from vllm.inputs import TokensPrompt

    from serve_app.replica.rows import encode_prompt
    from serve_app.wire import GenerationRequest

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [TokensPrompt(prompt_token_ids=encode_prompt(tok, GenerationRequest(request_id="-", prompt=p)))
            for p in PROMPTS]


def generate_tokens(llm, prompts, loras) -> list[list[int]]:
    """Greedy tokens (MAX_TOKENS, no stop) of one ``LLM.generate`` batch."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="session")
def banks(tiny32, tmp_path_factory):
    """Two banks over the same 4 PEFT adapters: JD-Full K=2 and JD-Diag K=1, both rank 8."""
    from transformers import AutoModelForCausalLM

    from compression import compress_collection, linear_shapes, load_peft_adapter
    from tests.serve_fixtures import make_peft_adapter

    tmp = tmp_path_factory.mktemp("adapters")
    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(tiny32))
    dirs = [make_peft_adapter(tiny32, tmp / f"lora{i}", seed=10 + i, scale=3.0) for i in range(4)]
    adapters = [load_peft_adapter(d, name=f"acme/a{i}", base_shapes=shapes) for i, d in enumerate(dirs)]
    return {"full": compress_collection(adapters, rank=8, clusters=2, method="full", seed=0),
            "diag": compress_collection(adapters, rank=8, clusters=1, method="diag", seed=0)}


@pytest.fixture(scope="session")
def dense_expected(tiny32, banks, tmp_path_factory) -> dict[str, list[list[int]]]:
    """Plain vLLM (dense LoRAs exported from each bank): greedy tokens per bank for PROMPTS/LAYOUT, and base.

    max_loras = 9 > the 8 distinct LoRAs this engine ever sees, so its last slot stays empty: vLLM's CPU
    ops read the −1 slot of rows without adapter as the last slot (with 5 slots, the 8 LoRAs of two
    banks filled it and the base rows of the second bank came out wrong)."""
    from vllm.lora.request import LoRARequest

    from compression import export_adapter

    tmp = tmp_path_factory.mktemp("dense")
    out = {}
    prompts = token_prompts(tiny32)
    with vllm_engine(tiny32, enable_lora=True, max_loras=9, max_cpu_loras=16, max_lora_rank=8) as llm:
        for tag, bank in banks.items():
            loras = [LoRARequest(f"{tag}{i}", 10 * (tag == "diag") + i + 1,
                                 str(export_adapter(bank, bank.adapters[i], tmp / tag / str(i)))) for i in range(4)]
            out[tag] = generate_tokens(llm, prompts, [None if a is None else loras[a] for a in LAYOUT])
        out["base"] = generate_tokens(llm, prompts, None)
    return out


@pytest.fixture(scope="session")
def experts(tiny32, tmp_path_factory):
    """Two saved experts (real connector and expert classes, random weights) with different insertion
    layers and slot counts: [(expert dir, connectors dir)]."""
    from tests.vllm_plugin.experts import save_random_expert

    tmp = tmp_path_factory.mktemp("experts")
    return [save_random_expert(tiny32, tmp / "a", layer=1, num_slots=2, seed=1),
            save_random_expert(tiny32, tmp / "b", layer=2, num_slots=4, seed=2)]
