"""The refit queue: one named Ray actor per bank that runs ``train_jobs.bank_sweep.refit_bank`` on demand.

When an upload leaves too much of a bank stored exactly (``cluster.banks.RefitPolicy``), the
router calls :func:`queue_refit`. The bank's ``BankRefitter`` (a detached actor named after the
store and the bank, so every router replica finds the same one) runs at most one refit at a
time; requests that arrive while one runs coalesce into a single follow-up run, which then sees
every adapter uploaded meanwhile. Each refit is a Ray task running the Tune sweep on the bank's
adapters and publishing the chosen bank (merging concurrent uploads); replicas pick the new
version up as they pick up any bank (broadcast or registry poll).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import asdict, dataclass

import ray

from cluster.logs import get_logger

log = get_logger("bank_refit")
NAMESPACE = "atelier"


@dataclass(frozen=True)
class RefitRequest:
    """Everything a refit needs (what ``python -m train_jobs.bank_sweep --bank-adapters --publish`` takes)."""

    store: str
    bank: str
    model: str
    budget: float | None = None
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    clusters: tuple[int, ...] = (1, 2, 4, 8)
    methods: tuple[str, ...] = ("full", "diag", "lowrank")
    max_rank: int | None = None
    trial_cpus: float = 0.5
    max_concurrent: int = 1
    out: str | None = None


@ray.remote(num_cpus=0)
def _refit_task(request: dict) -> dict:
    from train_jobs.bank_sweep import refit_bank

    return refit_bank(request["store"], request["bank"], request["model"], request["budget"],
                      tuple(request["ranks"]), tuple(request["clusters"]), tuple(request["methods"]),
                      request["out"], request["max_concurrent"], request["trial_cpus"], request["max_rank"])


@ray.remote(num_cpus=0)
class BankRefitter:
    """Serialises the refits of one bank: one running, at most one pending (the latest request)."""

    def __init__(self) -> None:
        self.pending: dict | None = None
        self.running: asyncio.Task | None = None
        self.runs: list[dict] = []

    async def request(self, request: dict) -> str:
        """Queue a refit; returns "started" or "queued" (after the running one)."""
        self.pending = request
        if self.running is None or self.running.done():
            self.running = asyncio.get_running_loop().create_task(self._drain())
            return "started"
        return "queued"

    async def _drain(self) -> None:
        while self.pending is not None:
            request, self.pending = self.pending, None
            start = time.time()
            try:
                result = await _refit_task.remote(request)
                self.runs.append({"ok": True, "started_at": start, "seconds": round(time.time() - start, 1),
                                  "published_version": result.get("published_version"),
                                  "choice": result.get("choice"), "merged": result.get("merged_after_refit")})
            except Exception as exc:  # keep the queue alive; the next request retries
                log.error("bank_refit.failed", bank=request["bank"], error=repr(exc))
                self.runs.append({"ok": False, "started_at": start, "error": repr(exc)})

    async def status(self) -> dict:
        return {"running": self.running is not None and not self.running.done(), "pending": self.pending is not None,
                "runs": self.runs}


def refitter_name(store: str, bank: str) -> str:
    return f"bank-refit-{hashlib.sha256(store.encode()).hexdigest()[:10]}-{bank}"


def refitter(store: str, bank: str):
    """The bank's refit actor (created on first use, shared by every process of the cluster)."""
    return BankRefitter.options(name=refitter_name(store, bank), namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


def queue_refit(request: RefitRequest) -> str:
    """Ask the bank's refitter to refit; "started" or "queued". Call from a process connected to Ray."""
    state = ray.get(refitter(request.store, request.bank).request.remote(asdict(request)), timeout=30)
    log.info("bank_refit.requested", bank=request.bank, state=state)
    return state


def refit_status(store: str, bank: str) -> dict:
    """The refitter's state: running, pending, and every finished run."""
    return ray.get(refitter(store, bank).status.remote(), timeout=30)
