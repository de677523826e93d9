"""lora_io: PEFT directory parsing, α/r folding, validation errors, and export round trips."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compression.errors import AdapterFormatError
from compression.lora_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    linear_shapes,
    load_peft_adapter,
    peft_key,
    save_peft_adapter,
    validate_adapter,
)

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (64, 64), V: (32, 64)}


def factor_tensors(module: str, d_out: int, d_in: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        peft_key(module, "A"): torch.randn(r, d_in, generator=g),
        peft_key(module, "B"): torch.randn(d_out, r, generator=g),
    }


def write_dir(path, tensors, **config):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | config
    path.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, str(path / ADAPTER_WEIGHTS))
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    return path


@pytest.fixture
def raw():
    return factor_tensors(Q, 64, 64, 4, seed=1) | factor_tensors(V, 32, 64, 4, seed=2)


def test_alpha_over_r_is_folded_into_B(tmp_path, raw):
    adapter = load_peft_adapter(write_dir(tmp_path / "a", raw, r=4, lora_alpha=8))
    B, A = adapter.factors[Q]
    torch.testing.assert_close(B, raw[peft_key(Q, "B")] * 2.0)
    torch.testing.assert_close(A, raw[peft_key(Q, "A")])
    assert adapter.name == "a" and adapter.rank == 4 and adapter.ranks == {Q: 4, V: 4}
    assert adapter.target_modules == ("q_proj", "v_proj")
    torch.testing.assert_close(adapter.delta(Q), 2.0 * raw[peft_key(Q, "B")] @ raw[peft_key(Q, "A")])


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path, raw):
    adapter = load_peft_adapter(write_dir(tmp_path / "a", raw, r=4, lora_alpha=6, use_rslora=True))
    torch.testing.assert_close(adapter.factors[V][0], raw[peft_key(V, "B")] * (6 / math.sqrt(4)))


def test_rank_and_alpha_patterns_apply_per_module(tmp_path):
    tensors = factor_tensors(Q, 64, 64, 4, seed=1) | factor_tensors(V, 32, 64, 2, seed=2)
    adapter = load_peft_adapter(
        write_dir(
            tmp_path / "a",
            tensors,
            r=4,
            lora_alpha=8,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 6},
        )
    )
    assert adapter.ranks == {Q: 4, V: 2}
    torch.testing.assert_close(adapter.factors[Q][0], tensors[peft_key(Q, "B")] * 2.0)  # 8 / 4
    torch.testing.assert_close(adapter.factors[V][0], tensors[peft_key(V, "B")] * 3.0)  # 6 / 2


def test_half_precision_factors_are_loaded_as_fp32(tmp_path, raw):
    adapter = load_peft_adapter(write_dir(tmp_path / "a", {k: v.bfloat16() for k, v in raw.items()}))
    assert all(B.dtype == A.dtype == torch.float32 for B, A in adapter.factors.values())


def test_linear_shapes_names_match_peft_keys():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 6), "v_proj": nn.Linear(8, 4, bias=False)})
            self.norm = nn.LayerNorm(8)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    shapes = linear_shapes(model)
    assert shapes == {
        "layers.0.attn.q_proj": (6, 8),
        "layers.0.attn.v_proj": (4, 8),
        "layers.1.attn.q_proj": (6, 8),
        "layers.1.attn.v_proj": (4, 8),
    }


def test_base_validation_accepts_matching_adapter(tmp_path, raw):
    load_peft_adapter(write_dir(tmp_path / "a", raw), base_shapes=SHAPES)


BAD_CASES = {
    "missing config": (
        lambda p, t: (p.mkdir(), save_file(t, str(p / ADAPTER_WEIGHTS))),
        "adapter_config.json",
    ),
    "missing weights": (lambda p, t: write_dir(p, None), "missing adapter_model.safetensors"),
    "pickle only": (
        lambda p, t: (write_dir(p, None), (p / "adapter_model.bin").write_bytes(b"\x80\x04")),
        "refusing to unpickle",
    ),
    "nan": (
        lambda p, t: write_dir(p, t | {peft_key(Q, "B"): t[peft_key(Q, "B")] * float("nan")}),
        f"module '{Q}': lora_B contains NaN",
    ),
    "int dtype": (
        lambda p, t: write_dir(p, t | {peft_key(Q, "A"): torch.ones(4, 64, dtype=torch.int32)}),
        "lora_A has dtype torch.int32",
    ),
    "rank mismatch": (lambda p, t: write_dir(p, t | {peft_key(Q, "A"): torch.randn(3, 64)}), "rank mismatch"),
    "config r": (lambda p, t: write_dir(p, t, r=8), "fields 'r'/'rank_pattern' say 8"),
    "bad r": (lambda p, t: write_dir(p, t, r="four"), "field 'r' must be a positive int"),
    "dora": (lambda p, t: write_dir(p, t, use_dora=True), "field 'use_dora'"),
    "extra key": (
        lambda p, t: write_dir(p, t | {"base_model.model.x.lora_magnitude_vector": torch.ones(4)}),
        "unexpected tensor key 'base_model.model.x.lora_magnitude_vector'",
    ),
    "missing B": (
        lambda p, t: write_dir(p, {k: v for k, v in t.items() if k != peft_key(V, "B")}),
        f"module '{V}' has no lora_B",
    ),
    "bad json": (lambda p, t: (write_dir(p, t), (p / ADAPTER_CONFIG).write_text("{r: 4")), "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_adapter_dirs_raise_errors_naming_the_problem(tmp_path, raw, case):
    make, message = BAD_CASES[case]
    make(tmp_path / "a", raw)
    with pytest.raises(AdapterFormatError, match=re.escape(message)):
        load_peft_adapter(tmp_path / "a")


def test_unknown_module_and_wrong_shape_against_base(tmp_path, raw):
    extra = factor_tensors("model.layers.9.self_attn.q_proj", 64, 64, 4, seed=3)
    with pytest.raises(
        AdapterFormatError, match="'model.layers.9.self_attn.q_proj' is not a Linear of the base"
    ):
        load_peft_adapter(write_dir(tmp_path / "a", raw | extra), base_shapes=SHAPES)
    with pytest.raises(
        AdapterFormatError, match=r"module 'model.layers.0.self_attn.v_proj' has ΔW shape .*\(32, 64\)"
    ):
        load_peft_adapter(write_dir(tmp_path / "b", raw), base_shapes={Q: (64, 64), V: (32, 48)})


def test_in_memory_adapters_are_validated_too():
    with pytest.raises(AdapterFormatError, match="adapter 'x', module 'm': lora_A contains NaN"):
        LoraAdapter("x", {"m": (torch.ones(4, 2), torch.full((2, 3), float("inf")))})
    adapter = LoraAdapter("x", {"m": (torch.ones(4, 2), torch.ones(2, 3))})
    with pytest.raises(AdapterFormatError, match="module 'm' is not a Linear"):
        validate_adapter(adapter, {"n": (4, 3)})


def test_export_round_trip_with_mixed_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    factors = {
        Q: (torch.randn(64, 3, generator=g), torch.randn(3, 64, generator=g)),
        V: (torch.randn(32, 5, generator=g), torch.randn(5, 64, generator=g)),
        "model.layers.1.self_attn.q_proj": (torch.randn(64, 3, generator=g), torch.randn(3, 64, generator=g)),
    }
    save_peft_adapter(factors, tmp_path / "out", base_model="tiny")
    config = json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        3,
        3,
        {V: 5},
        {V: 5},
    )
    assert config["target_modules"] == ["q_proj", "v_proj"]
    loaded = load_peft_adapter(tmp_path / "out")
    assert loaded.base_model == "tiny" and set(loaded.factors) == set(factors)
    for module, (B, A) in factors.items():
        torch.testing.assert_close(loaded.delta(module), B @ A)
