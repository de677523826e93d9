"""exact: adapters whose projection error exceeds the budget are stored as uploaded (exact clusters),
checked by what the bank computes (the batched op and the export), not by flags."""

from __future__ import annotations

import pytest
import torch

from compression.bank import bank_param_count, exact_param_count, load_bank, save_bank
from compression.batched import bank_delta
from compression.collection import adapter_factors, collection_param_count, compress_collection
from compression.exact import (
    add_exact,
    add_within_budget,
    exact_bank,
    mean_error,
    remove_adapter,
    serve_within_budget,
)
from compression.jd import JDConfig
from compression.lora_io import LoraAdapter
from compression.synthetic_adapters import synthetic_collection

SHAPES = {"layers.0.q": (32, 24), "layers.0.v": (16, 24), "layers.1.q": (32, 24)}
CONFIG = JDConfig(diag_iters=30)


def random_adapter(name: str, rank: int, seed: int, modules=SHAPES) -> LoraAdapter:
    """An adapter in a random subspace of every module (nothing in common with any other)."""
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g))
               for m, (d_out, d_in) in modules.items()}
    return LoraAdapter(name=name, factors=factors, base_model="", target_modules=("q", "v"), rank=rank)


def served_delta(bank, name: str, module: str) -> torch.Tensor:
    """ΔW the batched serving op applies for adapter `name`: bank_delta on the identity."""
    mb = bank.modules[module]
    d_in = mb.V.shape[1]
    eye = torch.eye(d_in)
    rows = torch.full((d_in,), bank.index(name))
    out = bank_delta(eye, mb.U, mb.V, mb.sigma, torch.tensor(bank.clusters), rows, bank.method)  # row j = ΔW e_j
    return out.T


def assert_serves_exactly(bank, adapter: LoraAdapter) -> None:
    for module in bank.modules:
        want = adapter.delta(module) if module in adapter.factors else torch.zeros(bank.modules[module].shape)
        torch.testing.assert_close(served_delta(bank, adapter.name, module), want, rtol=1e-5, atol=1e-5)
        B, A = adapter_factors(bank, adapter.name)[module]
        torch.testing.assert_close(B @ A, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def family():
    """8 adapters of 2 planted groups (rank 4, latent rank 2): a rank-4 K=2 bank holds them closely."""
    return synthetic_collection(9, SHAPES, clusters=2, r0=4, latent_rank=2, noise=0.02, seed=3)


@pytest.mark.parametrize("method", ["full", "diag"])
def test_foreign_adapter_is_served_exactly_and_family_member_compressed(family, method):
    bank = compress_collection(family.adapters[:-1], rank=4, clusters=2, method=method, config=CONFIG)
    member, foreign = family.adapters[-1], random_adapter("foreign", 4, seed=11)

    grown, placed = add_within_budget(bank, member, budget=0.05)
    assert placed.served == "compressed" and placed.recon_error == placed.projection_error <= 0.05
    assert grown.num_clusters == 2 and not grown.exact

    grown, placed = add_within_budget(grown, foreign, budget=0.05)
    assert placed.served == "exact" and placed.recon_error == 0.0 and placed.projection_error > 0.5
    assert grown.num_clusters == 3 and grown.exact == {"foreign": (0, 4)}
    assert_serves_exactly(grown, foreign)
    # the other adapters are served exactly as before the exact one arrived
    for name in bank.adapters:
        for module in SHAPES:
            torch.testing.assert_close(served_delta(grown, name, module), served_delta(bank, name, module))


def test_exact_adapters_share_clusters_side_by_side_and_raise_the_rank_when_needed():
    bank = exact_bank(random_adapter("a", 4, seed=1))
    assert bank.rank == 4 and bank.exact == {"a": (0, 4)} and bank.shared_clusters == []
    bank = add_exact(bank, random_adapter("b", 8, seed=2))  # wider than the bank: rank 8, zero padded
    assert bank.rank == 8 and bank.num_clusters == 2 and bank.exact == {"a": (0, 4), "b": (0, 8)}
    bank = add_exact(bank, random_adapter("c", 2, seed=3))  # fits next to "a" in cluster 0
    bank = add_exact(bank, random_adapter("d", 2, seed=4))
    assert bank.num_clusters == 2 and bank.exact["c"] == (4, 2) and bank.exact["d"] == (6, 2)
    assert bank.clusters == [0, 1, 0, 0]
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 2, 3), ("d", 2, 4)):
        assert_serves_exactly(bank, random_adapter(name, rank, seed))
        assert all(B.shape[1] == rank for B, _ in adapter_factors(bank, name).values())  # export: own rank
    # memory per exact adapter = its uploaded size, plus one Σ row per module
    uploaded = collection_param_count([random_adapter(n, r, 0) for n, r in (("a", 4), ("b", 8), ("c", 2), ("d", 2))])
    assert exact_param_count(bank) == bank_param_count(bank) == uploaded + 4 * 8 * len(SHAPES)

    freed = remove_adapter(bank, "c")  # slot [4, 6) is free again and is reused first
    assert freed.exact == {"a": (0, 4), "b": (0, 8), "d": (6, 2)}
    refill = add_exact(freed, random_adapter("e", 2, seed=5))
    assert refill.exact["e"] == (4, 2) and refill.num_clusters == 2
    assert_serves_exactly(refill, random_adapter("d", 2, seed=4))
    assert_serves_exactly(refill, random_adapter("e", 2, seed=5))
    alone = remove_adapter(remove_adapter(refill, "a"), "d")
    alone = remove_adapter(alone, "e")  # cluster 0 is empty now: dropped, "b" renumbered
    assert alone.num_clusters == 1 and alone.clusters == [0] and alone.adapters == ["b"]
    assert remove_adapter(alone, "b") is None


def test_adapter_with_more_modules_than_the_bank_joins_it(family):
    bank = compress_collection(family.adapters[:4], rank=4, clusters=1, method="full", config=CONFIG)
    wider = random_adapter("wider", 4, seed=7, modules={**SHAPES, "layers.1.v": (16, 24)})
    grown, placed = add_within_budget(bank, wider, budget=0.05)
    assert placed.served == "exact" and "layers.1.v" in grown.modules
    assert_serves_exactly(grown, wider)
    assert all(grown.recon_error[a]["layers.1.v"] == 0.0 for a in bank.adapters)
    assert float(served_delta(grown, bank.adapters[0], "layers.1.v").abs().max()) == 0.0


@pytest.mark.parametrize("method", ["full", "diag"])
def test_refit_then_budget_serves_every_adapter_within_it(family, method):
    foreign = [random_adapter(f"foreign-{i}", 4, seed=20 + i) for i in range(2)]
    adapters = [*family.adapters, *foreign]
    bank = compress_collection(adapters, rank=4, clusters=2, method=method, config=CONFIG)
    assert max(mean_error(bank.recon_error[a.name]) for a in foreign) > 0.1
    served = serve_within_budget(bank, adapters, budget=0.05)
    assert {"foreign-0", "foreign-1"} <= set(served.exact) and sorted(served.adapters) == sorted(bank.adapters)
    assert all(mean_error(served.recon_error[a]) <= 0.05 for a in served.adapters)
    for adapter in adapters:
        if adapter.name in served.exact:
            assert_serves_exactly(served, adapter)
    if method == "full":  # JD-Full at the planted rank holds the family within the budget
        assert sorted(served.exact) == ["foreign-0", "foreign-1"]
    for adapter in (a for a in family.adapters if a.name not in served.exact):  # served as the fit left them
        for module in SHAPES:
            torch.testing.assert_close(served_delta(served, adapter.name, module),
                                       served_delta(bank, adapter.name, module))


def test_exact_slots_survive_save_and_load_and_bad_slots_are_refused(tmp_path):
    bank = add_exact(exact_bank(random_adapter("c", 4, seed=3)), random_adapter("a", 2, seed=1))
    bank = add_exact(bank, random_adapter("b", 2, seed=2))
    assert bank.exact == {"c": (0, 4), "a": (0, 2), "b": (2, 2)} and bank.clusters == [0, 1, 1]
    loaded = load_bank(save_bank(bank, tmp_path / "bank"))
    assert loaded.exact == bank.exact and loaded.clusters == bank.clusters
    assert_serves_exactly(loaded, random_adapter("c", 4, seed=3))
    from dataclasses import replace

    from compression.errors import BankFormatError

    with pytest.raises(BankFormatError, match="exact.b"):
        replace(bank, exact={**bank.exact, "b": (1, 2)})  # overlaps "a"
    with pytest.raises(BankFormatError, match="outside"):
        replace(bank, exact={**bank.exact, "b": (3, 2)})
    with pytest.raises(BankFormatError, match="not in the bank"):
        replace(bank, exact={**bank.exact, "zz": (0, 1)})


def _serve_one_by_one(bank, adapters, budget):
    """The reference: each over-budget adapter removed and added back exactly, one after another."""
    by_name = {a.name: a for a in adapters}
    for name in [a for a in bank.adapters if a not in bank.exact and mean_error(bank.recon_error[a]) > budget]:
        bank = add_exact(remove_adapter(bank, name), by_name[name], check_base_model=False)
    return bank


@pytest.mark.parametrize("method", ["full", "diag", "lowrank"])
@pytest.mark.parametrize("budget", [0.05, 0.0])  # 0: every adapter exact, every shared cluster dropped
def test_serving_within_budget_in_one_pass_equals_one_by_one(family, method, budget):
    narrow = [random_adapter(f"narrow-{i}", 2, seed=40 + i) for i in range(3)]  # packed side by side
    wide = random_adapter("wide", 6, seed=50)  # wider than the bank: raises its rank
    adapters = [*family.adapters, *narrow, wide]
    bank = compress_collection(adapters, rank=4, clusters=2, method=method, config=CONFIG)
    bank = add_exact(bank, random_adapter("already", 2, seed=60))  # an exact slot with room beside it
    adapters.append(random_adapter("already", 2, seed=60))
    got, want = serve_within_budget(bank, adapters, budget), _serve_one_by_one(bank, adapters, budget)
    assert (got.adapters, got.clusters, got.exact, got.num_clusters, got.rank) == (
        want.adapters, want.clusters, want.exact, want.num_clusters, want.rank)
    assert got.recon_error == want.recon_error and set(got.exact) >= {"wide", "already"}
    for m in got.modules:
        for field in ("U", "V", "sigma"):
            torch.testing.assert_close(getattr(got.modules[m], field), getattr(want.modules[m], field))
    for adapter in adapters:
        if adapter.name in got.exact:
            assert_serves_exactly(got, adapter)
