"""Learning from use: what ``auto`` decided per response, and the tenant's feedback on it.

Both live in the registry's store as JSON (never pickle), per tenant, so every router replica
sees them and one tenant's feedback can never reach another's router::

    routing/<tenant>/decisions/<hour>/<response id>.json   an auto decision (prompt, chosen)
    routing/<tenant>/feedback/<ms>-<uuid>.json              one feedback: prompt, label, vote

Decisions are kept ``decision_ttl_s`` (feedback must arrive within it; older hour buckets are
deleted as new decisions arrive); they are also held in memory on the replica that answered.
Feedback files are append-only (no read-modify-write race between router replicas); the
``memory_size`` most recent form the tenant's nearest-neighbour memory
(:class:`~serve_app.ingress.routing.recommender.MemoryItem`), older ones are deleted.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.logs import get_logger
from cluster.storage import Storage
from serve_app.ingress.routing.recommender import BASE, MemoryItem

ROOT = "routing"
log = get_logger("routing.feedback")


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/feedback``: which customization was right for a ``model="auto"``
    response (``right_model``: ``"<tenant>/<name>"`` or ``"base"``), or a thumbs ``rating``."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=100, description="the response's id (chatcmpl-… / cmpl-…)")
    right_model: str | None = Field(None, min_length=1, max_length=200)
    rating: Literal["up", "down"] | None = None

    @model_validator(mode="after")
    def _one(self) -> FeedbackRequest:
        if (self.right_model is None) == (self.rating is None):
            raise ValueError("send exactly one of right_model ('<tenant>/<name>' or 'base') or rating ('up'/'down')")
        return self


class Decision(BaseModel):
    """What ``auto`` chose for one response."""

    model_config = ConfigDict(extra="ignore")
    id: str
    tenant: str
    prompt: str
    chosen: str
    created_at: float = Field(default_factory=time.time)


class Feedback(BaseModel):
    """One piece of feedback, as stored."""

    model_config = ConfigDict(extra="ignore")
    response_id: str
    tenant: str
    prompt: str
    label: str  # the customization the prompt belongs to (vote +1) or not (vote -1); or "base"
    vote: int = Field(ge=-1, le=1)
    chosen: str
    created_at: float = Field(default_factory=time.time)
    key_id: str | None = None


class FeedbackStore:
    """Per-tenant decisions and feedback memory on one store; thread-safe, cached."""

    def __init__(self, store: Storage, memory_size: int = 500, decision_ttl_s: float = 3600,
                 cache_ttl_s: float = 2.0, recent_decisions: int = 10_000):
        self.store, self.memory_size, self.decision_ttl_s = store, memory_size, decision_ttl_s
        self.cache_ttl_s, self.recent_decisions = cache_ttl_s, recent_decisions
        self._recent: OrderedDict[str, Decision] = OrderedDict()
        self._memory: dict[str, tuple[float, list[MemoryItem]]] = {}
        self._files: dict[str, dict[str, MemoryItem | None]] = {}  # tenant -> feedback file -> item
        self._pruned: dict[str, float] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auto-decisions")

    def record(self, decision: Decision) -> None:
        """Remember a decision now and persist it in the background (never fails the request)."""
        self.remember(decision)

        def write() -> None:
            try:
                self.persist(decision)
            except Exception as exc:  # storage trouble: feedback then works on this replica only
                log.warning("routing.decision_not_persisted", id=decision.id, error=repr(exc))
        self._writer.submit(write)

    # ------------------------------------------------------------------ decisions
    def remember(self, decision: Decision) -> None:
        """Hold a decision in memory now (cheap; call on the request path)."""
        with self._lock:
            self._recent[decision.id] = decision
            while len(self._recent) > self.recent_decisions:
                self._recent.popitem(last=False)

    def persist(self, decision: Decision) -> None:
        """Write a decision to the store (off the request path) and drop expired hour buckets."""
        hour = int(decision.created_at // 3600)
        self.store.write_bytes(f"{ROOT}/{decision.tenant}/decisions/{hour}/{decision.id}.json",
                               decision.model_dump_json().encode())
        now = time.time()
        with self._lock:
            if now - self._pruned.get(decision.tenant, 0.0) < 60:
                return
            self._pruned[decision.tenant] = now
        oldest = int((now - self.decision_ttl_s) // 3600)
        for bucket in self.store.list_dir(f"{ROOT}/{decision.tenant}/decisions"):
            if bucket.isdigit() and int(bucket) < oldest:
                self.store.delete_dir(f"{ROOT}/{decision.tenant}/decisions/{bucket}")

    def decision(self, tenant: str, response_id: str) -> Decision | None:
        """The decision behind ``response_id`` if it belongs to ``tenant`` and is not expired."""
        with self._lock:
            found = self._recent.get(response_id)
        if found is None and "/" not in response_id and ".." not in response_id:
            now = time.time()
            for hour in range(int(now // 3600), int((now - self.decision_ttl_s) // 3600) - 1, -1):
                try:
                    raw = self.store.read_bytes(f"{ROOT}/{tenant}/decisions/{hour}/{response_id}.json")
                except FileNotFoundError:
                    continue
                found = Decision.model_validate_json(raw)
                break
        if found is None or found.tenant != tenant or time.time() - found.created_at > self.decision_ttl_s:
            return None
        return found

    # ------------------------------------------------------------------ feedback memory
    def add(self, feedback: Feedback) -> int:
        """Store one feedback (append-only); returns the tenant's memory size."""
        stamp = f"{int(feedback.created_at * 1000):015d}-{uuid.uuid4().hex[:8]}"
        self.store.write_bytes(f"{ROOT}/{feedback.tenant}/feedback/{stamp}.json", feedback.model_dump_json().encode())
        names = self.store.list_dir(f"{ROOT}/{feedback.tenant}/feedback")
        for old in names[: max(0, len(names) - self.memory_size)]:
            self.store.delete_file(f"{ROOT}/{feedback.tenant}/feedback/{old}")
        with self._lock:
            self._memory.pop(feedback.tenant, None)
        return min(len(names), self.memory_size)

    def memory(self, tenant: str | None) -> list[MemoryItem]:
        """The tenant's most recent ``memory_size`` feedback items (listing cached ``cache_ttl_s``;
        feedback files are immutable, so each is read once per replica)."""
        if tenant is None:  # admin keys route across tenants and have no memory of their own
            return []
        with self._lock:
            hit = self._memory.get(tenant)
            if hit and time.monotonic() - hit[0] < self.cache_ttl_s:
                return hit[1]
            known = dict(self._files.get(tenant, {}))
        names = self.store.list_dir(f"{ROOT}/{tenant}/feedback")[-self.memory_size:]
        files: dict[str, MemoryItem | None] = {}
        for name in names:
            if name in known:
                files[name] = known[name]
                continue
            try:
                f = Feedback.model_validate_json(self.store.read_bytes(f"{ROOT}/{tenant}/feedback/{name}"))
                files[name] = MemoryItem(f.prompt, f.label, f.vote) if f.tenant == tenant else None
            except (FileNotFoundError, ValueError):  # pruned meanwhile, or unreadable: skip
                files[name] = None
        items = [m for m in files.values() if m is not None]
        with self._lock:
            self._files[tenant] = files
            self._memory[tenant] = (time.monotonic(), items)
        return items


def feedback_items(decision: Decision, right_model: str | None, rating: str | None) -> list[tuple[str, int]]:
    """(label, vote) pairs a feedback call adds: the right model (+1; and -1 for a wrong choice),
    or a thumbs up (+1 on what was chosen) / down (-1 on it; down on ``base`` says nothing usable)."""
    if right_model is not None:
        items = [(right_model, 1)]
        if decision.chosen != right_model and decision.chosen != BASE:
            items.append((decision.chosen, -1))
        return items
    if rating == "up":
        return [(decision.chosen, 1)]
    return [(decision.chosen, -1)] if decision.chosen != BASE else []
