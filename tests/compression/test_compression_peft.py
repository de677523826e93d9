"""PEFT compatibility on a tiny random Llama: our loader reads PEFT's files, PEFT loads our exports."""

from __future__ import annotations

import pytest
import torch

from compression.collection import adapter_factors, compress_collection, export_adapter
from compression.lora_io import linear_shapes, load_peft_adapter, save_peft_adapter
from compression.synthetic_adapters import synthetic_collection

peft = pytest.importorskip("peft")

IDS = torch.randint(128, (2, 6), generator=torch.Generator().manual_seed(0))


def merged_logits(tiny_llama, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference: the base model with W += ΔW for each module, no PEFT involved."""
    model = tiny_llama(0)
    for module, dW in deltas.items():
        model.get_submodule(module).weight.data += dW
    with torch.no_grad():
        return model(IDS).logits


def peft_logits(tiny_llama, adapter_dir) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(tiny_llama(0), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_exported_factors_load_in_peft_unchanged(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(1)
    shapes = linear_shapes(tiny_llama(0))
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",  # rank 3
        "model.layers.0.self_attn.v_proj",  # rank 5 (rank_pattern); layer 1 v_proj not exported
        "model.layers.1.mlp.down_proj",
    ]
    factors = {}
    for m, r in zip(modules, (3, 3, 5, 3), strict=True):
        d_out, d_in = shapes[m]
        factors[m] = (0.1 * torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g))
    save_peft_adapter(factors, tmp_path / "adapter")
    expected = merged_logits(tiny_llama, {m: B @ A for m, (B, A) in factors.items()})
    # target_modules are suffixes, so PEFT also wraps the unexported q/v/down_proj (with ΔW = 0) and says so
    with pytest.warns(UserWarning, match="missing adapter keys"):
        got = peft_logits(tiny_llama, tmp_path / "adapter")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, merged_logits(tiny_llama, {}), atol=1e-3)


def test_peft_saved_adapter_loads_with_scaling_folded(tiny_llama, tmp_path):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"up_proj": 3},
    )
    model = peft.get_peft_model(tiny_llama(0), config)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero; make the adapter non-trivial
            param.data.normal_()
    model.save_pretrained(str(tmp_path / "trained"))
    adapter = load_peft_adapter(tmp_path / "trained", base_shapes=linear_shapes(tiny_llama(0)))
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if hasattr(m, "get_delta_weight")
    }
    assert set(adapter.factors) == set(layers) and len(layers) == 6
    for module, layer in layers.items():
        torch.testing.assert_close(
            adapter.delta(module), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6
        )
    assert adapter.ranks["model.layers.0.self_attn.v_proj"] == 2


@pytest.mark.parametrize("method", ["full", "diag", "lowrank"])
def test_exported_bank_adapter_reproduces_the_reconstruction_in_peft(tiny_llama, tmp_path, method):
    shapes = {
        m: s for m, s in linear_shapes(tiny_llama(0)).items() if m.endswith(("q_proj", "k_proj", "o_proj"))
    }
    collection = synthetic_collection(5, shapes, clusters=2, r0=4, noise=0.2, seed=4)
    bank = compress_collection(collection.adapters, rank=6, clusters=2, method=method)
    name = bank.adapters[1]
    export_adapter(bank, name, tmp_path / "export")
    expected = merged_logits(tiny_llama, {m: B @ A for m, (B, A) in adapter_factors(bank, name).items()})
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "export"), expected, rtol=1e-4, atol=1e-5)
