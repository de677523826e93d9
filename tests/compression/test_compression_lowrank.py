"""lowrank: the JD-Full fit with Σ_i stored as P_i Q_iᵀ (rank R = the LoRA rank) — the same bank as
JD-Full, served by the same op, in 2rR numbers per adapter and module instead of r²."""

from __future__ import annotations

import pytest
import torch

from compression.bank import bank_param_count, load_bank, save_bank
from compression.batched import bank_delta
from compression.collection import adapter_factors, add_adapter, compress_collection
from compression.exact import add_within_budget
from compression.jd import JDConfig, sigma_matrix
from compression.synthetic_adapters import synthetic_collection
from tests.compression.test_compression_exact import assert_serves_exactly, random_adapter, served_delta

SHAPES = {"layers.0.q": (32, 24), "layers.0.v": (16, 24), "layers.1.q": (32, 24)}
CONFIG = JDConfig(diag_iters=30)
RANK, R0 = 12, 4


@pytest.fixture(scope="module")
def banks():
    coll = synthetic_collection(9, SHAPES, clusters=2, r0=R0, latent_rank=3, noise=0.2, seed=5)
    full = compress_collection(coll.adapters[:-1], rank=RANK, clusters=2, method="full", config=CONFIG)
    low = compress_collection(coll.adapters[:-1], rank=RANK, clusters=2, method="lowrank", config=CONFIG)
    return coll, full, low


def test_lowrank_is_jd_full_stored_factored(banks):
    coll, full, low = banks
    assert low.clusters == full.clusters and low.method == "lowrank"
    n = len(low.adapters)
    for m, mb in low.modules.items():
        torch.testing.assert_close(mb.U, full.modules[m].U)
        assert mb.sigma.shape == (n, RANK, 2 * R0)
        torch.testing.assert_close(sigma_matrix(mb.sigma, "lowrank"), full.modules[m].sigma, rtol=1e-4, atol=1e-5)
        for a in low.adapters:
            assert low.recon_error[a][m] == pytest.approx(full.recon_error[a][m], rel=1e-3, abs=1e-6)
    saved = sum(n * (RANK * RANK - 2 * RANK * R0) for _ in SHAPES)  # r² vs 2rR per adapter and module
    assert bank_param_count(full) - bank_param_count(low) == saved > 0


@pytest.mark.parametrize("shape", [(5, 24), (5, 3, 24)])
def test_lowrank_bank_delta_serves_the_same_deltas(banks, shape):
    _, full, low = banks
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, -1, 3, 7, 3])
    for m in ("layers.0.q", "layers.0.v"):
        f, lo = full.modules[m], low.modules[m]
        clusters = torch.tensor(low.clusters)
        torch.testing.assert_close(bank_delta(x, lo.U, lo.V, lo.sigma, clusters, rows, "lowrank"),
                                   bank_delta(x, f.U, f.V, f.sigma, clusters, rows), rtol=1e-4, atol=1e-5)
    for name in low.adapters[:3]:  # the export has rank R, not r, and the same ΔW
        for m, (B, A) in adapter_factors(low, name).items():
            B2, A2 = adapter_factors(full, name)[m]
            assert B.shape[1] == R0 and B2.shape[1] == RANK
            torch.testing.assert_close(B @ A, B2 @ A2, rtol=1e-4, atol=1e-5)


def test_lowrank_add_exact_and_round_trip(banks, tmp_path):
    coll, full, low = banks
    member = coll.adapters[-1]
    grown, grown_full = add_adapter(low, member), add_adapter(full, member)
    for m in SHAPES:
        torch.testing.assert_close(served_delta(grown, member.name, m), served_delta(grown_full, member.name, m),
                                   rtol=1e-4, atol=1e-5)
    wide = random_adapter("wide", 6, seed=3)  # rank 6 > the core rank 4, from another subspace: exact
    grown, placed = add_within_budget(grown, wide, budget=0.05)
    assert placed.served == "exact" and all(mb.sigma.shape[2] == 12 for mb in grown.modules.values())
    assert_serves_exactly(grown, wide)
    narrow = random_adapter("narrow", 2, seed=4)
    grown, placed = add_within_budget(grown, narrow, budget=0.05)
    assert placed.served == "exact" and grown.exact["narrow"] == (6, 2)  # next to "wide" in its exact cluster
    loaded = load_bank(save_bank(grown, tmp_path / "bank"))
    for adapter in (wide, narrow):
        assert_serves_exactly(loaded, adapter)
    for name in low.adapters:  # the compressed ones are untouched by the core padding
        for m in SHAPES:
            torch.testing.assert_close(served_delta(loaded, name, m), served_delta(low, name, m), rtol=1e-5,
                                       atol=1e-6)
