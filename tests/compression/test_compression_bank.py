"""bank + collection: compress, save/load round trip, corruption refusal, add/export, parameter counts,
the per-adapter SVD baseline bank."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from compression.bank import (
    BANK_MANIFEST,
    BANK_WEIGHTS,
    _sha256,
    bank_param_count,
    load_bank,
    mean_recon_errors,
    save_bank,
)
from compression.collection import (
    adapter_factors,
    add_adapter,
    collection_param_count,
    compress_collection,
    export_adapter,
    svd_bank,
)
from compression.errors import BankFormatError
from compression.jd import JDConfig
from compression.lora_io import LoraAdapter, load_peft_adapter
from compression.synthetic_adapters import synthetic_collection

SHAPES = {"layers.0.q": (32, 24), "layers.0.v": (16, 24), "layers.1.q": (32, 24)}
CONFIG = JDConfig(diag_iters=30)


@pytest.fixture(scope="module")
def collection():
    return synthetic_collection(9, SHAPES, clusters=2, r0=4, latent_rank=2, noise=0.1, seed=0)


@pytest.fixture(scope="module", params=["full", "diag"])
def bank(request, collection):
    return compress_collection(
        collection.adapters[:-1], rank=4, clusters=2, method=request.param, config=CONFIG
    )


def dense_rel_error(dW, R):
    return float(((dW - R) ** 2).sum() / (dW**2).sum())


def test_bank_layout_and_errors_match_dense_reconstruction(bank, collection):
    n, r = 8, 4
    assert bank.adapters == [a.name for a in collection.adapters[:-1]] and bank.num_clusters == 2
    for module, (d_out, d_in) in SHAPES.items():
        mb = bank.modules[module]
        assert mb.U.shape == (2, d_out, r) and mb.V.shape == (2, d_in, r)
        assert mb.sigma.shape == ((n, r, r) if bank.method == "full" else (n, r))
    for adapter in collection.adapters[:-1]:
        factors = adapter_factors(bank, adapter.name)
        for module in SHAPES:
            B, A = factors[module]
            expected = dense_rel_error(adapter.delta(module), B @ A)
            assert bank.recon_error[adapter.name][module] == pytest.approx(expected, rel=1e-3, abs=1e-6)
            assert expected < 0.1  # planted structure: near-exact at rank latent²


def test_planted_clusters_are_found(bank, collection):
    pairs = set(zip(bank.clusters, collection.labels[:-1], strict=True))
    assert len(pairs) == 2


def test_save_load_round_trip(bank, tmp_path):
    loaded = load_bank(save_bank(bank, tmp_path / "bank"))
    for field in (
        "base_model",
        "base_model_hash",
        "method",
        "rank",
        "num_clusters",
        "adapters",
        "clusters",
        "recon_error",
    ):
        assert getattr(loaded, field) == getattr(bank, field), field
    for module, mb in bank.modules.items():
        for name in ("U", "V", "sigma"):
            torch.testing.assert_close(getattr(loaded.modules[module], name), getattr(mb, name))
    assert not list((tmp_path / "bank").glob(".*tmp*"))


def _rewrite_manifest(path, **changes):
    manifest = json.loads((path / BANK_MANIFEST).read_text())
    manifest.update(changes)
    (path / BANK_MANIFEST).write_text(json.dumps(manifest))


def _rewrite_tensors(path, edit):
    tensors = load_file(str(path / BANK_WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / BANK_WEIGHTS))
    _rewrite_manifest(path, weights_sha256=_sha256(path / BANK_WEIGHTS))  # consistent, but bad content


def _nan_sigma(t):
    t["layers.0.v.sigma"][0] = float("nan")


CORRUPTIONS = {
    "no manifest": (lambda p, other: (p / BANK_MANIFEST).unlink(), "missing bank.json"),
    "bad json": (lambda p, other: (p / BANK_MANIFEST).write_text("{"), "invalid JSON"),
    "version": (lambda p, other: _rewrite_manifest(p, version=99), "'format/version'"),
    "rank type": (lambda p, other: _rewrite_manifest(p, rank="4"), "bank field 'rank': must be int"),
    "cluster id": (lambda p, other: _rewrite_manifest(p, clusters=[0] * 7 + [5]), "bank field 'clusters'"),
    "adapters": (lambda p, other: _rewrite_manifest(p, adapters=["a"] * 8), "bank field 'adapters'"),
    "missing field": (lambda p, other: _rewrite_manifest(p, method=None), "bank field 'method'"),
    "errors": (lambda p, other: _rewrite_manifest(p, recon_error={}), "bank field 'recon_error'"),
    "other save": (
        lambda p, other: (p / BANK_WEIGHTS).write_bytes((other / BANK_WEIGHTS).read_bytes()),
        "bank field 'weights_sha256'",
    ),
    "nan": (
        lambda p, other: _rewrite_tensors(p, _nan_sigma),
        "bank field 'layers.0.v.sigma': must be finite",
    ),
    "missing tensor": (
        lambda p, other: _rewrite_tensors(p, lambda t: t.pop("layers.1.q.U")),
        "tensors missing ['layers.1.q.U']",
    ),
    "shape": (
        lambda p, other: _rewrite_manifest(
            p, module_shapes={**{m: list(s) for m, s in SHAPES.items()}, "layers.0.v": [16, 25]}
        ),
        "bank field 'module_shapes.layers.0.v'",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_refuses_corrupted_or_mismatched_banks(bank, collection, tmp_path, case):
    other = compress_collection(collection.adapters[:3], rank=2, method=bank.method, config=CONFIG)
    save_bank(other, tmp_path / "other")
    path = save_bank(bank, tmp_path / "bank")
    corrupt, message = CORRUPTIONS[case]
    corrupt(path, tmp_path / "other")
    with pytest.raises(BankFormatError, match=re.escape(message)):
        load_bank(path)


def test_in_memory_bank_is_validated(bank):
    module = next(iter(bank.modules))
    bad = {**bank.modules, module: replace(bank.modules[module], sigma=bank.modules[module].sigma[:-1])}
    with pytest.raises(BankFormatError, match=rf"bank field '{module}.sigma': shape"):
        replace(bank, modules=bad)


def test_add_adapter_projects_onto_its_planted_cluster(bank, collection):
    new = collection.adapters[-1]
    grown = add_adapter(bank, new)
    sibling = collection.labels[:-1].index(collection.labels[-1])
    assert grown.adapters[-1] == new.name and grown.clusters[-1] == bank.clusters[sibling]
    assert max(grown.recon_error[new.name].values()) < 0.3  # unseen adapter: worse than members, far below 1
    for module, mb in bank.modules.items():
        torch.testing.assert_close(grown.modules[module].sigma[:-1], mb.sigma)  # existing rows untouched
        torch.testing.assert_close(grown.modules[module].U, mb.U)


def test_adding_a_copy_of_a_member_reproduces_its_coefficients(bank, collection):
    member = collection.adapters[2]
    grown = add_adapter(bank, replace(member, name="copy"))
    assert grown.clusters[-1] == bank.clusters[2]
    for mb in grown.modules.values():
        torch.testing.assert_close(mb.sigma[-1], mb.sigma[2], rtol=1e-4, atol=1e-5)


def test_add_adapter_rejects_duplicates_unknown_modules_and_other_bases(bank, collection):
    with pytest.raises(ValueError, match="already in the bank"):
        add_adapter(bank, collection.adapters[0])
    stray = LoraAdapter("stray", {"layers.7.q": (torch.ones(32, 2), torch.ones(2, 24))})
    with pytest.raises(ValueError, match="module 'layers.7.q' is not a Linear of the base model"):
        add_adapter(bank, stray)
    other_base = replace(collection.adapters[-1], base_model="another-model")
    with pytest.raises(ValueError, match="check_base_model=False"):
        add_adapter(bank, other_base)


def test_adapters_targeting_different_modules(collection):
    partial = LoraAdapter("partial", {m: collection.adapters[0].factors[m] for m in ("layers.0.q",)})
    bank = compress_collection([*collection.adapters[1:4], partial], rank=4, clusters=1, config=CONFIG)
    assert bank.recon_error["partial"]["layers.0.v"] == 0
    assert bank.modules["layers.0.v"].sigma[-1].abs().max() == 0


def test_export_adapter_writes_the_reconstruction(bank, tmp_path):
    name = bank.adapters[3]
    loaded = load_peft_adapter(export_adapter(bank, name, tmp_path / "export"))
    c = bank.clusters[3]
    for module, mb in bank.modules.items():
        S = mb.sigma[3] if bank.method == "full" else torch.diag(mb.sigma[3])
        torch.testing.assert_close(loaded.delta(module), mb.U[c] @ S @ mb.V[c].T, rtol=1e-5, atol=1e-6)
        assert loaded.ranks[module] == bank.rank


def test_parameter_counts(bank, collection):
    n, K, r, r0 = 8, 2, 4, 4
    per_adapter = r * r if bank.method == "full" else r
    assert bank_param_count(bank) == sum(
        K * (d_out + d_in) * r + n * per_adapter for d_out, d_in in SHAPES.values()
    )
    assert collection_param_count(collection.adapters[:-1]) == n * sum(
        r0 * (a + b) for a, b in SHAPES.values()
    )


def test_compress_collection_input_errors(collection):
    adapters = collection.adapters
    with pytest.raises(ValueError, match="names must be unique"):
        compress_collection([adapters[0], adapters[0]], rank=2)
    with pytest.raises(ValueError, match="different base models"):
        compress_collection([adapters[0], replace(adapters[1], base_model="other")], rank=2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(d_out, d_in\)=16\]"):
        compress_collection(adapters[:2], rank=17)
    with pytest.raises(ValueError, match="method must be one of"):
        compress_collection(adapters[:2], rank=2, method="sparse")


def test_progress_callback_reports_seeding_and_rounds(collection):
    events = []
    compress_collection(collection.adapters, rank=4, clusters=2, progress=lambda *e: events.append(e))
    assert ("seed", 1, 2) in events and events[-1][0] == "cluster" and events[-1][2] == 10


@pytest.mark.parametrize("rank", [2, 6])
def test_svd_bank_is_the_dense_truncated_svd_per_adapter(collection, rank, tmp_path):
    partial = LoraAdapter("partial", {"layers.0.q": collection.adapters[3].factors["layers.0.q"]})
    adapters = [*collection.adapters[:3], partial]
    bank = svd_bank(adapters, rank=rank)
    assert (bank.method, bank.num_clusters, bank.clusters, bank.rank) == ("diag", 4, [0, 1, 2, 3], rank)
    dense_errors = []
    for adapter in adapters:
        factors = adapter_factors(bank, adapter.name)
        dense_errors.append(0.0)
        for module in SHAPES:
            B, A = factors[module]
            if module not in adapter.factors:
                assert B.abs().max() == 0 and bank.recon_error[adapter.name][module] == 0
                continue
            dW = adapter.delta(module)
            U, s, Vh = torch.linalg.svd(dW)
            k = min(rank, 4)  # LoRA rank r0 = 4: rank 6 is padded and exact
            best = U[:, :k] @ torch.diag(s[:k]) @ Vh[:k]
            torch.testing.assert_close(B @ A, best, rtol=1e-4, atol=1e-5)
            assert bank.recon_error[adapter.name][module] == pytest.approx(
                dense_rel_error(dW, best), rel=1e-3, abs=1e-6
            )
            dense_errors[-1] += dense_rel_error(dW, best) / len(SHAPES)  # missing modules count as 0
            if rank >= 4:
                assert bank.recon_error[adapter.name][module] < 1e-6
    assert mean_recon_errors(bank) == pytest.approx(dense_errors, rel=1e-3, abs=1e-6)
    assert bank_param_count(bank) == 4 * sum((d_out + d_in + 1) * rank for d_out, d_in in SHAPES.values())
    assert load_bank(save_bank(bank, tmp_path / "b")).clusters == bank.clusters
