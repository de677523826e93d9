"""vLLM LoRA settings come from the pool config (no vLLM import needed)."""

from __future__ import annotations

from serve_app.config import PoolConfig
from serve_app.replica.engine_vllm import vllm_lora_modules, vllm_options


def test_peft_module_names_map_to_vllm_packed_modules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.3.mlp.up_proj",
             "model.layers.3.mlp.down_proj", "o_proj"]
    assert vllm_lora_modules(names) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert vllm_lora_modules(["q_proj", "k_proj"]) == ["qkv_proj"]


def test_pool_lora_settings_reach_the_engine_options():
    pool = PoolConfig(name="v", engine="vllm", vllm={"max_lora_rank": 32, "max_loras": 5, "max_cpu_loras": 40,
                                                     "lora_target_modules": ["qkv_proj"]})
    opts = vllm_options(pool)
    assert (opts.max_lora_rank, opts.max_loras, opts.max_cpu_loras) == (32, 5, 40)
    assert opts.lora_target_modules == ["qkv_proj"]
    assert vllm_options(PoolConfig(name="w", engine="vllm")).lora_target_modules is None
