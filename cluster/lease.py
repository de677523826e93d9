"""Cross-process leases on the artifact store, for read-modify-publish sequences (bank updates).

A lease named ``n`` is a sequence of *generation* files ``locks/<n>/<gen>.json``; the highest
generation is the current state of the lease (held by the token in it, or released). Every
transition creates the next generation with the store's "create only if absent" primitive, so
exactly one process wins each one and no file is ever deleted and re-created under the same
name (no ABA). In particular a **stale** lease (a crashed holder, older than ``stale_after_s``)
is taken over by creating generation ``g + 1``: two processes that both judge ``g`` stale race
for the same new file and one of them loses. The old scheme (read the lock, see it is stale,
delete it, create a new one) let a slow breaker delete the lock a faster one had just taken.

Releasing rewrites the holder's own generation as released (atomic replace); if a newer
generation exists by then, the holder had overrun its lease and someone took it over: that is
logged, not hidden. An unreadable generation file (foreign or corrupted) counts as held; it is
stale once the store's modification time is older than ``stale_after_s``; waiting for it obeys
the same deadline as waiting for a live holder.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.logs import get_logger
from cluster.storage import Storage

log = get_logger("lease")
GEN_DIGITS = 12


class LeaseTimeout(TimeoutError):
    """The lease stayed held by another writer until the deadline."""


@dataclass(frozen=True)
class _Generation:
    number: int
    token: str | None  # None: unreadable
    at: float  # holder's timestamp, or the file's modification time when unreadable
    released: bool


def _gen_path(name: str, number: int) -> str:
    return f"locks/{name}/{number:0{GEN_DIGITS}d}.json"


def _generations(store: Storage, name: str) -> list[int]:
    return sorted(int(f[:-5]) for f in store.list_dir(f"locks/{name}")
                  if f.endswith(".json") and f[:-5].isdigit())


def _read(store: Storage, name: str, number: int) -> _Generation | None:
    """The generation's record; None if it vanished (cleaned up behind us)."""
    path = _gen_path(name, number)
    try:
        raw = store.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
        return _Generation(number, str(rec["token"]), float(rec["at"]), bool(rec.get("released", False)))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        mtime = store.modified_at(path)
        return _Generation(number, None, mtime if mtime is not None else time.time(), False)


def _record(token: str, released: bool = False) -> bytes:
    return json.dumps({"token": token, "at": time.time(), "released": released,
                       "host": socket.gethostname(), "pid": os.getpid()}).encode()


def try_acquire(store: Storage, name: str, token: str, stale_after_s: float) -> int | str:
    """One attempt: the generation number won, or a string saying who holds the lease."""
    gens = _generations(store, name)
    current = _read(store, name, gens[-1]) if gens else None
    if gens and current is None:
        return "cleaned up meanwhile"
    if current is not None and not current.released:
        age = time.time() - current.at
        if age <= stale_after_s:
            who = "an unreadable lock file" if current.token is None else f"token {current.token[:8]}"
            return f"held by {who} for {age:.1f} s (generation {current.number})"
    number = (current.number if current else 0) + 1
    if not store.create_exclusive(_gen_path(name, number), _record(token)):
        return f"generation {number} taken by another writer"
    if _generations(store, name)[-1] != number:  # we re-created a cleaned-up number: not current
        store.delete_file(_gen_path(name, number))
        return "a newer generation exists"
    if current is not None and not current.released:
        log.warning("lease.stale_taken_over", lease=name, generation=number,
                    stale_token=(current.token or "unreadable")[:8], age_s=round(time.time() - current.at, 1))
    for old in gens[:-1]:  # keep the previous generation for inspection, drop older ones
        store.delete_file(_gen_path(name, old))
    return number


def release(store: Storage, name: str, token: str, number: int) -> None:
    """Mark our generation released; report a lease lost to a takeover."""
    gens = _generations(store, name)
    if gens and gens[-1] != number:
        log.warning("lease.lost", lease=name, generation=number, newer=gens[-1],
                    fix="the holder overran stale_after_s; raise it for longer critical sections")
        return
    store.write_bytes(_gen_path(name, number), _record(token, released=True))


@contextmanager
def hold(store: Storage, name: str, stale_after_s: float = 120.0, wait_s: float = 60.0) -> Iterator[int]:
    """Hold lease ``name`` for the ``with`` block; yields its generation number.

    Raises :class:`LeaseTimeout` naming the holder after ``wait_s`` seconds without it.
    """
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"lease name {name!r} must be a single path segment")
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        got = try_acquire(store, name, token, stale_after_s)
        if isinstance(got, int):
            break
        if time.monotonic() >= deadline:
            raise LeaseTimeout(f"lock {name!r}: {got}; waited {wait_s:g} s; retry later "
                               f"(a crashed holder's lock is taken over after {stale_after_s:g} s)")
        time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)
    try:
        yield got
    finally:
        release(store, name, token, got)
