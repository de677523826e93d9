"""Fast tests of the bank plugin's parts that need no vLLM engine: the payload header, the host's
basis and LoRA bookkeeping, and the grouped delta against compression.bank_delta."""

from __future__ import annotations

import json

import pytest
import torch

from compression import bank_delta, compress_collection, export_adapter
from compression.collection import add_adapter
from compression.synthetic_adapters import synthetic_collection
from serve_app.vllm_plugin.bank_host import BankHost
from serve_app.vllm_plugin.bank_math import SlotTable, add_grouped_delta
from serve_app.vllm_plugin.bank_payload import decode_header, encode_header

SHAPES = {"layers.0.q_proj": (24, 16), "layers.0.v_proj": (8, 16)}


@pytest.fixture(scope="module")
def collection():
    torch.set_num_threads(1)
    return synthetic_collection(9, SHAPES, clusters=3, r0=2, seed=0).adapters


@pytest.fixture(scope="module")
def bank(collection):
    return compress_collection(collection[:8], rank=4, clusters=3, method="full", seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_header_survives_every_lora_dtype(dtype):
    for basis in (0, 1, 255, 257, 65_537, 2**31 - 1):
        assert decode_header(encode_header(basis).to(dtype)) == basis
    assert decode_header(torch.zeros(1, 64)) is None  # a warm-up LoRA's B
    assert decode_header(torch.randn(24, 4)) is None  # a dense LoRA's B
    with pytest.raises(ValueError):
        encode_header(-1)


def test_lowrank_sigma_reaches_the_payload_as_its_product(collection, tmp_path):
    from safetensors.torch import load_file

    from serve_app.vllm_plugin.bank_host import sigma_of

    low = compress_collection(collection[:8], rank=4, clusters=2, method="lowrank", seed=0)
    host = BankHost(tmp_path, max_rank=4)
    host.set_bank(low, 1)
    host.pending_install()
    lease = host.acquire(low.adapters[2])
    tensors = load_file(str(lease.path / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for module, mb in low.modules.items():
        sigma = tensors[f"base_model.model.{module}.lora_A.weight"]
        torch.testing.assert_close(sigma, sigma_of(low, module, 2))
        x = torch.randn(3, mb.shape[1], generator=g)
        idx = torch.tensor([2, -1, 2])
        want = bank_delta(x, mb.U, mb.V, mb.sigma, torch.tensor(low.clusters), idx, method="lowrank")
        got = (x @ mb.V[low.clusters[2]]) @ sigma.T @ mb.U[low.clusters[2]].T
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


def test_grouped_delta_equals_bank_delta(bank):
    """Slots hold (basis = cluster, Σ_adapter); tokens pick slots (−1 = none): same as bank_delta."""
    g = torch.Generator().manual_seed(0)
    slot_adapter = [5, 0, 7, 2]  # 4 slots
    table = SlotTable(max_loras=4, device="cpu")
    for slot, a in enumerate(slot_adapter):
        table.assign(slot, bank.clusters[a])
    table.installed = set(range(bank.num_clusters))
    token_slots = torch.tensor([-1, 0, 1, 1, 3, -1, 2, 0, 3, -1])
    token_adapters = torch.tensor([-1 if s < 0 else slot_adapter[s] for s in token_slots.tolist()])
    groups = table.plan(token_slots)
    assert table.plan(token_slots.clone()) is groups  # reused by every layer of a forward
    for mb in bank.modules.values():
        x = torch.randn(len(token_slots), mb.shape[1], generator=g)
        out = torch.zeros(len(token_slots), mb.shape[0])
        sigma = mb.sigma[slot_adapter]
        add_grouped_delta(out, x, mb.U, mb.V, sigma, groups)
        want = bank_delta(x, mb.U, mb.V, mb.sigma, torch.tensor(bank.clusters), token_adapters)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert out[token_slots < 0].abs().max() == 0
    table.installed.discard(bank.clusters[5])
    table.changed()
    with pytest.raises(RuntimeError, match="not installed"):
        table.plan(token_slots)


def test_host_installs_each_cluster_once_and_keeps_lora_ids(bank, collection, tmp_path):
    host = BankHost(tmp_path, max_rank=8)
    host.set_bank(bank, 1)
    assert len({k.split("/")[0] for k in _keys(host.pending_install())}) == bank.num_clusters
    old = [host.acquire(a) for a in bank.adapters]
    cfg = json.loads((old[0].path / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == bank.rank  # scaling 1: vLLM keeps the header bits
    # projecting a new adapter keeps every basis: nothing to install, old adapters keep their LoRA ids
    host.set_bank(add_adapter(bank, collection[8]), 2)
    assert host.pending_install() is None and host.pending_drop() == []
    again = [host.acquire(a) for a in bank.adapters]
    assert [x.lora_int_id for x in again] == [x.lora_int_id for x in old]
    new = host.acquire(collection[8].name)
    assert new.lora_int_id not in {x.lora_int_id for x in old}
    # a refit (other bases): the new ones are installed; the old ones wait for their running requests
    host.set_bank(compress_collection(collection, rank=4, clusters=2, method="diag", seed=1), 3)
    assert len({k.split("/")[0] for k in _keys(host.pending_install())}) == 2
    assert host.pending_drop() == []
    for lease in old + again:
        host.release(lease)
    assert host.pending_drop() == sorted({x.basis_id for x in old} - {new.basis_id})
    host.release(new)
    assert host.pending_drop() == [new.basis_id]


def test_payload_carries_sigma_and_basis(bank, tmp_path):
    from safetensors.torch import load_file

    host = BankHost(tmp_path, max_rank=4)
    host.set_bank(bank, 1)
    host.pending_install()
    name = bank.adapters[3]
    lease = host.acquire(name)
    tensors = load_file(str(lease.path / "adapter_model.safetensors"))
    for module, mb in bank.modules.items():
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        torch.testing.assert_close(a, mb.sigma[3])
        assert decode_header(tensors[f"base_model.model.{module}.lora_B.weight"]) == lease.basis_id
    export_adapter(bank, name, tmp_path / "dense")  # the dense form the layers must reproduce exists too
    with pytest.raises(ValueError, match="max_lora_rank"):
        BankHost(tmp_path, max_rank=2).set_bank(bank, 1)


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())
