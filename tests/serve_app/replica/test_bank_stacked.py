"""The bank's serving path (compression.batched.stacked_delta) equals the per-cluster loop.

Lives with the serving tests: it is the engine's hot path (issue 18 profiled and replaced the
per-module cluster loop); the reference is ``bank_delta``, itself tested against a dense loop.
"""

from __future__ import annotations

import pytest
import torch

from compression import batched
from compression.batched import RowPlan, bank_delta, stacked_delta

K, N_ADAPTERS, D_OUT, D_IN, R = 3, 7, 24, 16, 4


def tensors(method: str):
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(K, D_OUT, R, generator=g), torch.randn(K, D_IN, R, generator=g)
    sigma = torch.randn(N_ADAPTERS, R, R, generator=g) if method == "full" else torch.randn(N_ADAPTERS, R, generator=g)
    return U, V, sigma, torch.tensor([0, 2, 1, 0, 2, 2, 1])


def stacked(U, V):
    return U.permute(0, 2, 1).reshape(K * R, D_OUT), V.permute(1, 0, 2).reshape(D_IN, K * R)


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize("shape", [(9, D_IN), (9, 5, D_IN)])
def test_stacked_equals_cluster_loop(method, shape):
    U, V, sigma, clusters = tensors(method)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    indices = torch.tensor([3, -1, 0, 6, 1, 1, -1, 4, 2])
    U_cat, V_cat = stacked(U, V)
    got = stacked_delta(x, U_cat, V_cat, sigma, RowPlan.build(indices, clusters, K))
    torch.testing.assert_close(got, bank_delta(x, U, V, sigma, clusters, indices), rtol=1e-5, atol=1e-5)
    assert got[1].abs().max() == 0 and got[6].abs().max() == 0


def test_broadcast_plan_applies_one_adapter_to_every_row():
    U, V, sigma, clusters = tensors("full")
    x = torch.randn(5, 3, D_IN)
    U_cat, V_cat = stacked(U, V)
    got = stacked_delta(x, U_cat, V_cat, sigma, RowPlan.build(torch.tensor([4]), clusters, K))
    torch.testing.assert_close(got, bank_delta(x, U, V, sigma, clusters, torch.full((5,), 4)), rtol=1e-5, atol=1e-5)


def test_model_logits_equal_with_and_without_stacking(tiny_model, monkeypatch):
    """A whole HF model with an attached bank: stacked path == per-cluster loop, mixed rows."""
    from transformers import AutoModelForCausalLM

    from compression import attach_bank, compress_collection
    from compression.lora_io import linear_shapes
    from compression.synthetic_adapters import synthetic_collection

    model = AutoModelForCausalLM.from_pretrained(tiny_model.path).eval()
    shapes = {m: s for m, s in linear_shapes(model).items() if m.endswith(("q_proj", "v_proj"))}
    adapters = synthetic_collection(6, shapes, clusters=3, r0=4, seed=0).adapters
    bank = compress_collection(adapters, rank=8, clusters=3, base_model="tiny-random")
    ids = torch.randint(3, 300, (4, 7), generator=torch.Generator().manual_seed(2))
    rows = [adapters[0].name, None, adapters[5].name, adapters[2].name]
    out = {}
    for limit in (8, 0):
        monkeypatch.setattr(batched, "STACK_MAX_CLUSTERS", limit)
        handle = attach_bank(model, bank)
        assert all(layer.stacked == (limit == 8) for layer in handle.layers.values())
        with torch.no_grad(), handle.using(rows):
            out[limit] = model(input_ids=ids).logits
        handle.detach()
    torch.testing.assert_close(out[8], out[0], rtol=1e-4, atol=1e-4)
