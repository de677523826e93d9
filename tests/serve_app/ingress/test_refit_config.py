"""A pool's refit grid: its defaults are the refit's own, bad entries name the field, and the router
passes the pool's grid to the refit queue."""

import asyncio
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from cluster.bank_refit import RefitRequest
from serve_app.config import PoolConfig


def test_default_refit_grid_is_the_refit_jobs_own():
    pool, request = PoolConfig(name="p"), RefitRequest(store="s", bank="b", model="m")
    assert (tuple(pool.bank_refit_ranks), tuple(pool.bank_refit_clusters), tuple(pool.bank_refit_methods)) == (
        request.ranks, request.clusters, request.methods)


@pytest.mark.parametrize("field,value", [("bank_refit_ranks", [4, 0]), ("bank_refit_clusters", []),
                                         ("bank_refit_methods", ["sparse"])])
def test_bad_refit_grid_names_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        PoolConfig(name="p", **{field: value})


def test_router_queues_the_pools_grid(monkeypatch):
    import cluster.bank_refit
    from serve_app.ingress import routes_manage

    seen = []
    monkeypatch.setattr(cluster.bank_refit, "queue_refit", lambda request: seen.append(asdict(request)) or "started")
    pool = PoolConfig(name="p", bank_refit_ranks=[8], bank_refit_clusters=[1, 2], bank_refit_methods=["lowrank"])
    state = SimpleNamespace(registry=SimpleNamespace(store=SimpleNamespace(uri="/tmp/store")))
    assert asyncio.run(routes_manage._queue_refit(state, pool)) == "started"
    assert (seen[0]["ranks"], seen[0]["clusters"], seen[0]["methods"]) == ((8,), (1, 2), ("lowrank",))
    assert seen[0]["bank"] == pool.bank_name and seen[0]["max_rank"] is None
