"""Pool choice for model="auto" and named models: tiers, cost, and max_latency_ms against the
latency the router measured (serve_app.ingress.routing.pools). Pure logic, milliseconds."""

from __future__ import annotations

import pytest

from serve_app.config import PoolConfig
from serve_app.ingress.openai_api import RoutingHints
from serve_app.ingress.routing.pools import PoolChoiceError, PoolLatency, choose_pool

POOLS = [PoolConfig(name="small", latency_tier=1, cost_tier=2), PoolConfig(name="large", latency_tier=2, cost_tier=1),
         PoolConfig(name="gpu", latency_tier=1, cost_tier=3)]


def measured(**p50_ms: float) -> PoolLatency:
    lat = PoolLatency(window_s=60, min_samples=3)
    for pool, ms in p50_ms.items():
        for jitter in (0.9, 1.0, 1.1):
            lat.observe(pool, ms * jitter / 1000)
    return lat


def test_no_hint_keeps_the_default_pool_and_says_nothing():
    assert choose_pool(POOLS, None, "small", None) == ("small", None)
    assert choose_pool(POOLS[1:], RoutingHints(), "small", None) == ("large", None)


def test_tier_hints():
    pool, note = choose_pool(POOLS, RoutingHints(latency="low"), "large", None)
    assert pool == "small" and note["pool_choice"] == "lowest latency_tier"  # tie on tier 1: cheaper wins
    pool, note = choose_pool(POOLS, RoutingHints(cost="low"), "small", None)
    assert pool == "large" and note["pool_choice"] == "lowest cost_tier"


def test_budget_picks_the_cheapest_pool_that_fits():
    lat = measured(small=120, large=400, gpu=30)
    pool, note = choose_pool(POOLS, RoutingHints(max_latency_ms=500), "small", lat)
    assert pool == "large" and "cheapest" in note["pool_choice"]
    pool, note = choose_pool(POOLS, RoutingHints(max_latency_ms=200), "small", lat)
    assert pool == "small" and note["pools"]["large"]["p50_ms"] == pytest.approx(400, rel=1e-3)
    pool, note = choose_pool(POOLS, RoutingHints(max_latency_ms=200, latency="low"), "small", lat)
    assert pool == "gpu" and "lowest recent p50" in note["pool_choice"]


def test_budget_fallbacks_say_why():
    pool, note = choose_pool(POOLS, RoutingHints(max_latency_ms=10), "small", measured(small=120, large=400))
    assert pool == "small" and note["budget_met"] is False and "no pool's recent p50 fits" in note["pool_choice"]
    assert note["pools"]["gpu"] == {"latency_tier": 1, "cost_tier": 3, "p50_ms": None, "samples": 0}
    pool, note = choose_pool(POOLS[1:], RoutingHints(max_latency_ms=10), "small", PoolLatency())
    assert pool == "gpu" and "no pool has 3 recent requests" in note["pool_choice"]


def test_latency_window_forgets_old_requests(monkeypatch):
    import serve_app.ingress.routing.pools as pools

    clock = [1000.0]
    monkeypatch.setattr(pools.time, "monotonic", lambda: clock[0])
    lat = PoolLatency(window_s=10, min_samples=2)
    lat.observe("small", 1.0)
    lat.observe("small", 3.0)
    assert lat.p50_ms("small") == (2000.0, 2)
    clock[0] += 11
    lat.observe("small", 0.1)
    assert lat.p50_ms("small") == (None, 1)


def test_pool_hint_must_serve_the_model():
    assert choose_pool(POOLS, RoutingHints(pool="gpu"), "small", None)[0] == "gpu"
    with pytest.raises(PoolChoiceError, match="cannot serve this model"):
        choose_pool(POOLS[:2], RoutingHints(pool="gpu"), "small", None)
