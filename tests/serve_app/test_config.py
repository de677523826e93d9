"""The pool config: engine settings nest per engine, older flat names still load, every field is documented."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from serve_app.config import FLAT_ENGINE_KEYS, AppConfig, PoolConfig, load_app_config


def test_flat_engine_keys_load_into_their_sections():
    flat_keys = dict(torch_threads=2, prefill_chunk_tokens=64, max_lora_rank=32, max_loras=5, max_cpu_loras=40,
                     vllm_lora_target_modules=["qkv_proj"], vllm_memory_fraction=0.3, vllm_bank_layers=False,
                     vllm_experts=False)
    assert set(flat_keys) == set(FLAT_ENGINE_KEYS)  # every flat name is tried here
    flat = PoolConfig(name="v", engine="vllm", **flat_keys)
    nested = PoolConfig(name="v", engine="vllm", torch={"threads": 2, "prefill_chunk_tokens": 64},
                        vllm={"max_lora_rank": 32, "max_loras": 5, "max_cpu_loras": 40,
                              "lora_target_modules": ["qkv_proj"], "memory_fraction": 0.3,
                              "bank_layers": False, "experts": False})
    assert flat == nested
    assert not set(FLAT_ENGINE_KEYS) & set(flat.model_dump())  # flat names are inputs only
    from_yaml = load_app_config({"pools": [{"name": "p", "max_loras": 4, "vllm": {"max_cpu_loras": 4}}]})
    assert (from_yaml.pools[0].vllm.max_loras, from_yaml.pools[0].vllm.max_cpu_loras) == (4, 4)


def test_a_setting_given_twice_or_out_of_range_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"max_loras: also given as vllm.max_loras"):
        PoolConfig(max_loras=4, vllm={"max_loras": 4})
    with pytest.raises(ValidationError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        PoolConfig(vllm={"max_loras": 4, "max_cpu_loras": 2})
    with pytest.raises(ValidationError, match="vllm.bogus"):
        PoolConfig(vllm={"bogus": 1})


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    out = [model]
    seen.add(model)
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                out += _models(arg, seen)
    return out


def test_every_config_field_has_a_description_in_the_json_schema():
    models = _models(AppConfig, set())
    assert {m.__name__ for m in models} >= {"AppConfig", "PoolConfig", "TorchSettings", "VLLMSettings",
                                            "AutoscalingSpec", "RoutingConfig"}
    schema = AppConfig.model_json_schema()
    missing = [f"{m.__name__}.{name}" for m in models for name in m.model_fields
               if not schema["$defs"].get(m.__name__, schema)["properties"][name].get("description")]
    assert missing == []
