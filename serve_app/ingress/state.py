"""Per-router-replica state shared by the route modules: config, registry, catalog, pool handles."""

from __future__ import annotations

import threading
import time
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


@dataclass
class RouterState:
    config: AppConfig
    registry: Registry
    catalog: Catalog
    pools: dict  # pool name -> DeploymentHandle
    metrics: RouterMetrics | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))


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
