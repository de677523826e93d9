"""Fit beside the service, or fail fast: a job's pre-flight check of the cluster's free CPUs.

A Ray Train run whose workers do not fit waits forever at "Attempting to start training worker
group" and says nothing. On the 2-core head that `make demo` leaves running, Serve's replicas
hold CPUs, so a job submitted beside the service is exactly that case. :func:`require_cpus`
waits a bounded time for the CPUs a job's workers need (another job may be finishing) and then
raises :class:`InsufficientResources` naming what is missing and the ways out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.logs import get_logger

log = get_logger("resources")

DEFAULT_WAIT_S = 60.0


class InsufficientResources(RuntimeError):
    """The cluster cannot place a job's workers (now, and not within the wait)."""


@dataclass(frozen=True)
class CpuDemand:
    """What a job asks Ray for: ``workers`` bundles of ``cpus_per_worker`` CPUs each."""

    what: str  # e.g. "train_jobs.experts worker"
    workers: int
    cpus_per_worker: float
    flag: str  # the knob that sets cpus_per_worker, named in the error

    @property
    def total(self) -> float:
        return self.workers * self.cpus_per_worker


def _ray_view() -> tuple[dict, dict, list[float]]:
    import ray

    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return ray.available_resources(), ray.cluster_resources(), nodes


def require_cpus(demand: CpuDemand, wait_s: float = DEFAULT_WAIT_S,
                 view: Callable[[], tuple[dict, dict, list[float]]] = _ray_view, poll_s: float = 1.0) -> float:
    """Return the free CPUs once ``demand`` fits; raise :class:`InsufficientResources` if it never
    can (a worker bigger than every node) or does not within ``wait_s`` seconds."""
    deadline = time.monotonic() + max(0.0, wait_s)
    logged = False
    while True:
        free, total, node_cpus = view()
        free_cpu, total_cpu = free.get("CPU", 0.0), total.get("CPU", 0.0)
        biggest = max(node_cpus, default=total_cpu)
        if demand.cpus_per_worker > biggest:
            raise InsufficientResources(
                f"{demand.what}: each worker asks for {demand.cpus_per_worker:g} CPU but the largest node has "
                f"{biggest:g}; fix: {demand.flag} {biggest:g} or less")
        if free_cpu + 1e-9 >= demand.total:
            return free_cpu
        if time.monotonic() >= deadline:
            held = total_cpu - free_cpu
            raise InsufficientResources(
                f"{demand.what}: needs {demand.total:g} CPU ({demand.workers} worker(s) x {demand.cpus_per_worker:g}) "
                f"but only {free_cpu:g} of the cluster's {total_cpu:g} CPU are free ({held:g} held by the running "
                f"service or other jobs) after waiting {wait_s:g} s; fix: stop or shrink the service "
                f"(`serve shutdown`, or fewer replicas), lower {demand.flag} (fractional values such as 0.5 are "
                "fine for these single-threaded workers), or add a node")
        if not logged:
            log.info("resources.waiting", what=demand.what, need_cpu=demand.total, free_cpu=free_cpu,
                     total_cpu=total_cpu, wait_s=wait_s)
            logged = True
        time.sleep(poll_s)
