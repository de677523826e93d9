"""Which pool serves a request: tiers, cost, and a latency budget against measured latency.

The router measures every request it sends to a pool (time from sending to the replica's
answer, as the client sees it minus HTTP) in :class:`PoolLatency`: a sliding window per pool
(``window_s``, at most ``max_samples``). :func:`choose_pool` then applies the request's hints:

* ``max_latency_ms``: among the pools that can serve the model and whose recent p50 (at least
  ``min_samples`` requests in the window) fits the budget, the cheapest (``cost_tier``, then
  the lower p50); none fits → the pool with the lowest measured p50, stating that the budget
  cannot be met; nothing measured yet → the lowest ``latency_tier``, stating that;
* ``latency: "low"``: the lowest ``latency_tier`` (then ``cost_tier``); ``cost: "low"`` the
  lowest ``cost_tier`` (then ``latency_tier``); ``pool``: that pool (400 if it cannot serve);
* no hint: the default pool if it can serve the model, else the first that can.

The explanation (the response's ``atelier.routing``) names the rule, the pools considered and
their tiers and measured p50.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from serve_app.config import PoolConfig


class PoolLatency:
    """Recent request latencies per pool, as measured by this router replica."""

    def __init__(self, window_s: float = 300.0, max_samples: int = 512, min_samples: int = 3):
        self.window_s, self.max_samples, self.min_samples = window_s, max_samples, min_samples
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def observe(self, pool: str, seconds: float) -> None:
        with self._lock:
            q = self._samples.setdefault(pool, deque(maxlen=self.max_samples))
            q.append((time.monotonic(), seconds))

    def p50_ms(self, pool: str) -> tuple[float | None, int]:
        """(median latency in ms over the window, samples); None below ``min_samples``."""
        cutoff = time.monotonic() - self.window_s
        with self._lock:
            q = self._samples.get(pool, deque())
            while q and q[0][0] < cutoff:
                q.popleft()
            values = sorted(s for _, s in q)
        if len(values) < self.min_samples:
            return None, len(values)
        mid = len(values) // 2
        median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        return median * 1000, len(values)


class PoolChoiceError(ValueError):
    """The hints name a pool that cannot serve the model (→ HTTP 400)."""


def choose_pool(candidates: list[PoolConfig], hints, default: str, latency: PoolLatency | None) -> tuple[str, dict | None]:
    """(pool name, explanation or None when no hint was given). ``hints`` is a RoutingHints."""
    names = [p.name for p in candidates]
    if not hints or not any(getattr(hints, k, None) for k in ("pool", "latency", "cost", "max_latency_ms")):
        return (default if default in names else names[0]), None
    note = {"hints": hints.model_dump(exclude_none=True)}
    if hints.pool:
        if hints.pool not in names:
            raise PoolChoiceError(f"atelier.pool {hints.pool!r} cannot serve this model; choose one of {names}")
        return hints.pool, {**note, "pool": hints.pool, "pool_choice": "as requested"}
    budget = getattr(hints, "max_latency_ms", None)
    if budget is not None:
        measured = {p.name: (latency.p50_ms(p.name) if latency else (None, 0)) for p in candidates}
        note["pools"] = {p.name: {"latency_tier": p.latency_tier, "cost_tier": p.cost_tier,
                                  "p50_ms": None if measured[p.name][0] is None else round(measured[p.name][0], 1),
                                  "samples": measured[p.name][1]} for p in candidates}
        fits = [p for p in candidates if measured[p.name][0] is not None and measured[p.name][0] <= budget]
        if fits:
            if hints.latency == "low":
                best = min(fits, key=lambda p: (measured[p.name][0], p.cost_tier))
                rule = f"lowest recent p50 among pools within max_latency_ms={budget:g}"
            else:
                best = min(fits, key=lambda p: (p.cost_tier, measured[p.name][0]))
                rule = f"cheapest pool whose recent p50 fits max_latency_ms={budget:g}"
            return best.name, {**note, "pool": best.name, "pool_choice": rule}
        known = [p for p in candidates if measured[p.name][0] is not None]
        if known:
            best = min(known, key=lambda p: (measured[p.name][0], p.cost_tier))
            why = (f"fallback: no pool's recent p50 fits max_latency_ms={budget:g}; chose the fastest measured "
                   f"({measured[best.name][0]:.0f} ms)")
        else:
            best = min(candidates, key=lambda p: (p.latency_tier, p.cost_tier))
            why = (f"fallback: no pool has {latency.min_samples if latency else 'enough'} recent requests to measure "
                   "yet; chose the lowest latency_tier")
        return best.name, {**note, "pool": best.name, "pool_choice": why, "budget_met": False}
    if hints.latency == "low":
        best = min(candidates, key=lambda p: (p.latency_tier, p.cost_tier))
        return best.name, {**note, "pool": best.name, "pool_choice": "lowest latency_tier"}
    if hints.cost == "low":
        best = min(candidates, key=lambda p: (p.cost_tier, p.latency_tier))
        return best.name, {**note, "pool": best.name, "pool_choice": "lowest cost_tier"}
    return (default if default in names else names[0]), {**note, "pool": default if default in names else names[0],
                                                          "pool_choice": "default pool"}
