"""batched: the per-row mixed-adapter forward equals a dense per-row loop (op and whole HF model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.batched import attach_bank, bank_delta
from compression.collection import adapter_factors, compress_collection
from compression.jd import JDConfig
from compression.lora_io import linear_shapes
from compression.synthetic_adapters import synthetic_collection

K, N_ADAPTERS, D_OUT, D_IN, R = 3, 7, 24, 16, 4


def random_bank_tensors(method: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(K, D_OUT, R, generator=g), torch.randn(K, D_IN, R, generator=g)
    sigma = (
        torch.randn(N_ADAPTERS, R, R, generator=g)
        if method == "full"
        else torch.randn(N_ADAPTERS, R, generator=g)
    )
    clusters = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    return U, V, sigma, clusters


def dense_delta_loop(x, U, V, sigma, clusters, indices):
    out = torch.zeros(*x.shape[:-1], D_OUT)
    for row, i in enumerate(indices.tolist()):
        if i < 0:
            continue
        S = sigma[i] if sigma.dim() == 3 else torch.diag(sigma[i])
        c = int(clusters[i])
        out[row] = x[row] @ (U[c] @ S @ V[c].T).T
    return out


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize("shape", [(9, D_IN), (9, 5, D_IN)])
def test_bank_delta_equals_dense_per_row_loop(method, shape):
    U, V, sigma, clusters = random_bank_tensors(method)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    indices = torch.tensor([3, -1, 0, 6, 1, 1, -1, 4, 2])  # every cluster, repeats, rows without adapter
    got = bank_delta(x, U, V, sigma, clusters, indices)
    torch.testing.assert_close(got, dense_delta_loop(x, U, V, sigma, clusters, indices), rtol=1e-5, atol=1e-5)
    assert got[1].abs().max() == 0 and got[6].abs().max() == 0


def test_bank_delta_rejects_bad_indices():
    U, V, sigma, clusters = random_bank_tensors("full")
    x = torch.randn(3, D_IN)
    with pytest.raises(ValueError, match=r"one adapter id per batch row: shape \(3,\)"):
        bank_delta(x, U, V, sigma, clusters, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"adapter indices must be in \[-1, 7\)"):
        bank_delta(x, U, V, sigma, clusters, torch.tensor([0, 7, -1]))


TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    shapes = linear_shapes(LlamaForCausalLM(config))
    return {m: s for m, s in shapes.items() if m.rsplit(".", 1)[-1] in TARGETS}


@pytest.mark.parametrize("method", ["full", "diag", "lowrank"])
def test_attached_bank_matches_per_row_merged_models(tiny_llama, llama_shapes, method):
    collection = synthetic_collection(6, llama_shapes, clusters=2, r0=4, noise=0.3, seed=2)
    bank = compress_collection(
        collection.adapters, rank=4, clusters=2, method=method, config=JDConfig(diag_iters=20)
    )
    assert len(set(bank.clusters)) == 2
    ids = torch.randint(128, (4, 7), generator=torch.Generator().manual_seed(0))
    rows = [bank.adapters[0], None, bank.adapters[5], 3]  # names, base-only row, raw index; mixed clusters
    assert bank.clusters[0] != bank.clusters[3] or bank.clusters[5] != bank.clusters[3]

    model = tiny_llama(0)
    with torch.no_grad():
        base_logits = model(ids).logits
        handle = attach_bank(model, bank)
        with handle.using(rows):
            batched = model(ids).logits
        assert handle.selection.indices is None
        torch.testing.assert_close(model(ids).logits, base_logits)  # outside `using`: plain base model

    for row, adapter in enumerate(rows):
        reference = tiny_llama(0)
        if adapter is not None:
            name = adapter if isinstance(adapter, str) else bank.adapters[adapter]
            for module, (B, A) in adapter_factors(bank, name).items():
                reference.get_submodule(module).weight.data += B @ A
        with torch.no_grad():
            expected = reference(ids[row : row + 1]).logits[0]
        torch.testing.assert_close(batched[row], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], base_logits[0], atol=1e-3)  # the delta is not negligible

    handle.detach()
    assert all(type(model.get_submodule(m)) is nn.Linear for m in bank.modules)


def test_attach_bank_rejects_mismatched_models(tiny_llama, llama_shapes):
    collection = synthetic_collection(2, llama_shapes, r0=2, seed=3)
    bank = compress_collection(collection.adapters, rank=2)
    model = tiny_llama(0)
    handle = attach_bank(model, bank)
    with pytest.raises(ValueError, match="already attached"):
        attach_bank(model, bank)
    handle.detach()
    with pytest.raises(ValueError, match="out of range"):
        handle.indices_for([5])
    model.model.layers[1].mlp.down_proj = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="bank module 'model.layers.1.mlp.down_proj' has shape"):
        attach_bank(model, bank)
    del model.model.layers[1]
    with pytest.raises(ValueError, match="is not in the model"):
        attach_bank(model, bank)


def test_using_one_broadcasts_one_adapter_to_every_batch_size(tiny_llama, llama_shapes):
    collection = synthetic_collection(4, llama_shapes, clusters=2, r0=4, noise=0.3, seed=4)
    bank = compress_collection(collection.adapters, rank=4, clusters=2, method="full")
    name = bank.adapters[2]
    model = tiny_llama(0)
    handle = attach_bank(model, bank)
    ids = torch.randint(128, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with handle.using([name] * 3):
            per_row = model(ids).logits
        with handle.using_one(name):
            broadcast = model(ids).logits
            single = model(ids[1:2]).logits  # a different batch size inside the same block
            with handle.using([None]):  # nested selection wins, then the broadcast is restored
                base_row = model(ids[:1]).logits
            again = model(ids[:2]).logits
        assert handle.selection.indices is None and not handle.selection.broadcast
        base = model(ids).logits
    torch.testing.assert_close(broadcast, per_row)
    torch.testing.assert_close(single[0], per_row[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, per_row[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_row[0], base[0])
    assert not torch.allclose(broadcast, base, atol=1e-3)
