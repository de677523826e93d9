"""Per-router-replica state shared by the route modules: config, registry, catalog, pool handles."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.registry import Registry
from serve_app.config import AppConfig
from serve_app.ingress.catalog import Catalog
from serve_app.ingress.openai_api import OpenAIError
from serve_app.metrics import RouterMetrics


class RateLimiter:
    """Token bucket per API key: ``rpm`` requests per minute, bursts up to ``rpm``."""

    def __init__(self, rpm: int):
        self.rpm = rpm
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str) -> None:
        if self.rpm <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.rpm), now))
            tokens = min(float(self.rpm), tokens + (now - last) * self.rpm / 60.0)
            if tokens < 1.0:
                retry = (1.0 - tokens) * 60.0 / self.rpm
                self._buckets[key_id] = (tokens, now)
                raise OpenAIError(429, f"rate limit of {self.rpm} requests/minute exceeded; retry in "
                                       f"{retry:.1f} s", type_="rate_limit_error", code="rate_limit_exceeded")
            self._buckets[key_id] = (tokens - 1.0, now)


class TenantGate:
    """Per-tenant in-flight cap on this router replica, work-conserving: while another tenant is
    active here (a request in flight or waiting, or one ended within ``active_s``), a tenant may have
    at most ``limit`` requests in flight to the pools; more wait here, in arrival order, for up to
    ``wait_s`` (then 503). A tenant alone is never held back. So a flood queues behind its own cap
    instead of filling every row of the shared pool's batches, and another tenant's request finds
    room at once (the replica's per-tenant fair queue then shares each batch). ``limit`` 0: no cap.
    Single-threaded: used from the router's event loop only."""

    def __init__(self, limit: int, wait_s: float, active_s: float = 2.0):
        self.limit, self.wait_s, self.active_s = limit, wait_s, active_s
        self._in_flight: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._seen: dict[str, float] = {}  # tenant -> when it last entered or left
        self._changed = asyncio.Event()

    def _others_active(self, tenant: str, now: float) -> bool:
        return any(t != tenant and (self._in_flight.get(t, 0) or self._waiting.get(t, 0) or now - seen < self.active_s)
                   for t, seen in self._seen.items())

    def _may_enter(self, tenant: str) -> bool:
        return self._in_flight.get(tenant, 0) < self.limit or not self._others_active(tenant, time.monotonic())

    def _forget_idle(self, now: float) -> None:
        for t in [t for t, seen in self._seen.items() if now - seen > self.active_s
                  and not self._in_flight.get(t, 0) and not self._waiting.get(t, 0)]:
            del self._seen[t]
            self._in_flight.pop(t, None)
            self._waiting.pop(t, None)

    async def enter(self, tenant: str) -> Callable[[], None]:
        """Wait until ``tenant`` may send one more request; returns the function that ends it (call once)."""
        if self.limit <= 0:
            return lambda: None
        now = time.monotonic()
        if len(self._seen) > 1000:
            self._forget_idle(now)
        self._seen[tenant] = now
        if not self._may_enter(tenant):
            self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
            try:
                while not self._may_enter(tenant):
                    left = now + self.wait_s - time.monotonic()
                    if left <= 0:
                        raise OpenAIError(503, f"tenant {tenant!r} has had {self.limit} requests in flight for "
                                               f"{self.wait_s:g} s while other tenants were served "
                                               "(tenant_max_in_flight); retry later or send fewer at once",
                                          type_="overloaded", code="tenant_in_flight_limit")
                    try:  # woken by any release; re-checked as others go idle
                        await asyncio.wait_for(self._changed.wait(), min(left, self.active_s / 4))
                    except asyncio.TimeoutError:
                        pass
            finally:
                self._waiting[tenant] -= 1
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self._in_flight[tenant] -= 1
                self._seen[tenant] = time.monotonic()
                self._changed.set()  # wake the waiters; later ones wait on a fresh event
                self._changed = asyncio.Event()
        return release


@dataclass
class RouterState:
    config: AppConfig
    registry: Registry
    catalog: Catalog
    pools: dict  # pool name -> DeploymentHandle
    metrics: RouterMetrics | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    gate: TenantGate = field(default_factory=lambda: TenantGate(0, 0.0))


_STATE: RouterState | None = None


def set_state(state: RouterState) -> None:
    """Install this process's router state (Serve copies the FastAPI app into each replica,
    so the state lives in this module, not on the app object)."""
    global _STATE
    _STATE = state


def get_state() -> RouterState:
    if _STATE is None:
        raise RuntimeError("router state not initialised")
    return _STATE
