"""Refitting a served bank: :func:`refit_bank`, and the queue of one named Ray actor per bank that runs it.

:func:`refit_bank` re-reads the adapters a bank holds, runs the Tune sweep (``cluster.bank_tune``),
refits the smallest bank within the budget and publishes it, adding back every adapter uploaded
while it ran (:func:`publish_refit`). It lives here, on the ground floor, because both the service
(the router queues refits) and the bank job (``python -m train_jobs.bank_sweep --bank-adapters
--publish``) run it.

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
from pathlib import Path

import ray

from cluster.banks import adapter_sha256, load_registry_adapter, place_adapter, publish_bank, read_bank
from cluster.logs import get_logger
from cluster.models import resolve_model
from cluster.registry import Registry
from cluster.settings import load_settings
from cluster.validators import install_validators
from compression import DEFAULT_ERROR_BUDGET, collection_param_count
from compression.selection import choose, fit_within_budget

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


def load_bank_collection(registry: Registry, bank_name: str, model) -> tuple[list, dict[str, str], int | None]:
    """The adapters a bank holds, as uploaded (latest registry versions), their weights' SHA-256, and the
    bank version they were read from."""
    bank, version = read_bank(registry, bank_name)
    if bank is None:
        return [], {}, None
    adapters, shas = [], {}
    for name in bank.adapters:
        tenant, artifact = name.split("/", 1)
        shas[name] = adapter_sha256(registry, tenant, artifact)
        adapters.append(load_registry_adapter(registry, tenant, artifact, model))
    return adapters, shas, version


def publish_refit(registry: Registry, bank_name: str, bank, used: dict[str, str], model, budget: float,
                  metadata: dict, max_rank: int | None = None) -> tuple[int, list[str]]:
    """Publish a refitted bank without losing uploads made while it was fitted.

    Under the bank lock: every adapter of the latest bank that the refit did not see, or saw in an
    older upload (SHA-256 of its weights differs), is added to the refitted bank within ``budget``.
    Returns (version, names added back)."""
    with registry.lock(f"bank-{bank_name}"):
        latest, latest_version = read_bank(registry, bank_name)
        merged, since = [], 0
        for name in latest.adapters if latest is not None else []:
            tenant, artifact = name.split("/", 1)
            if name in used and adapter_sha256(registry, tenant, artifact) == used[name]:
                continue
            bank, placed = place_adapter(bank, load_registry_adapter(registry, tenant, artifact, model), budget,
                                         model, max_rank)
            merged.append(name)
            if placed.served == "exact":
                since += sum(d_out + d_in for d_out, d_in in (mb.shape for mb in bank.modules.values())) * \
                    bank.exact[name][1]
        version = publish_bank(registry, bank_name, bank, {
            **metadata, "based_on": latest_version, "merged_after_refit": merged, "error_budget": budget,
            "exact_params_since_refit": since})
    return version, merged


def refit_bank(store: str, bank_name: str, model_name: str, budget: float | None = None,
               ranks: tuple[int, ...] = (4, 8, 16, 32), clusters: tuple[int, ...] = (1, 2, 4, 8),
               methods: tuple[str, ...] = ("full", "diag", "lowrank"), out: str | None = None, max_concurrent: int = 1,
               trial_cpus: float = 1.0, max_rank: int | None = None, seed: int = 0) -> dict:
    """Refit ``system/bank/<bank_name>`` from the adapters it holds: sweep, refit the smallest bank within
    the budget, publish (merging concurrent uploads). What the service queues when a refit is due."""
    from cluster.bank_tune import run_sweep, write_report  # ray.tune: imported by the refit, not by its queue

    start = time.perf_counter()
    budget = DEFAULT_ERROR_BUDGET if budget is None else budget
    install_validators()
    registry, model = Registry(store), resolve_model(model_name)
    out_dir = Path(out) if out else load_settings().home / "bank-sweeps" / f"{bank_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    adapters, used, version = load_bank_collection(registry, bank_name, model)
    if not adapters:
        return {"bank": bank_name, "published_version": None, "reason": "no bank"}
    ranks = [r for r in ranks if max_rank is None or r <= max_rank]
    log.info("refit.start", bank=bank_name, version=version, adapters=len(adapters), budget=budget)
    rows = run_sweep(adapters, ranks, list(clusters), list(methods), out_dir / "tune", max_concurrent, seed, budget,
                     trial_cpus)
    choice = choose(rows)
    report = write_report(out_dir, rows, len(adapters), collection_param_count(adapters), budget, choice)
    _, bank = fit_within_budget(adapters, choice.rank, choice.clusters, choice.method, budget, seed, model)
    published, merged = publish_refit(registry, bank_name, bank, used, model, budget, {
        "refit": {"from_version": version, "sweep": str(out_dir), **choice.__dict__}}, max_rank)
    report.update(bank=bank_name, from_version=version, published_version=published, merged_after_refit=merged,
                  seconds=round(time.perf_counter() - start, 1))
    log.info("refit.done", bank=bank_name, version=published, merged=len(merged), seconds=report["seconds"],
             choice=choice.__dict__)
    return report



@ray.remote(num_cpus=0)
def _refit_task(request: dict) -> dict:
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
    pending = refitter(request.store, request.bank).request.remote(asdict(request))
    try:
        state = ray.get(pending, timeout=30)
    except ray.exceptions.GetTimeoutError:  # the refitter is still starting (a loaded box); the request
        state = "queued"                    # is in its queue all the same and runs once it is up
    log.info("bank_refit.requested", bank=request.bank, state=state)
    return state


def refit_status(store: str, bank: str) -> dict:
    """The refitter's state: running, pending, and every finished run."""
    return ray.get(refitter(store, bank).status.remote(), timeout=30)
