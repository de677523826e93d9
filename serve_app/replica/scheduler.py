"""Scheduling policy of the torch engine (no torch here): who waits, who runs, where its KV lives.

* :class:`FairQueue` — waiting requests, one FIFO per tenant, admitted round-robin across tenants,
  so one tenant's flood cannot starve another (a tenant with one request waits for at most one
  admission per other waiting tenant, not for the whole flood).
* :class:`SlotTable` — KV-cache slots. Decoding rows always fill slots ``0..D-1`` (so a decode step
  attends over one contiguous view); prefilling rows sit above. It returns the slot moves the
  cache must perform when a row leaves (the last decoding row takes its slot) or finishes its
  prefill (it moves to slot D).
* :func:`plan_prefill` — the prefill work of one step under a token budget (chunked prefill): a
  long prompt is split over several steps, and every step still runs one decode step for the
  rows already generating, so nobody stalls behind it for long.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    """What the policy needs to know about a row."""

    tenant: str
    slot: int
    cached: int
    """Positions already in the KV cache."""
    prefill_len: int
    """Prompt + slot positions that prefill must put in the cache."""


R = TypeVar("R", bound=Schedulable)


class FairQueue(Generic[R]):
    """Per-tenant FIFOs served round-robin; ``pop`` takes the next tenant's oldest request."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[R]] = OrderedDict()

    def push(self, item: R) -> None:
        self._queues.setdefault(item.tenant, deque()).append(item)

    def pop(self) -> R | None:
        """The oldest request of the tenant whose turn it is; that tenant goes to the back."""
        while self._queues:
            tenant, queue = next(iter(self._queues.items()))
            self._queues.move_to_end(tenant)
            if queue:
                item = queue.popleft()
                if not queue:
                    del self._queues[tenant]
                return item
            del self._queues[tenant]
        return None

    def remove_if(self, predicate: Callable[[R], bool]) -> list[R]:
        """Drop (and return) every waiting item matching ``predicate`` (cancelled requests)."""
        dropped: list[R] = []
        for tenant in list(self._queues):
            queue = self._queues[tenant]
            keep = deque(x for x in queue if not predicate(x))
            dropped += [x for x in queue if predicate(x)]
            if keep:
                self._queues[tenant] = keep
            else:
                del self._queues[tenant]
        return dropped

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[R]:
        for queue in self._queues.values():
            yield from queue


@dataclass(frozen=True)
class Move:
    """Copy slot ``src``'s first ``length`` positions to slot ``dst`` (``swap``: exchange them)."""

    src: int
    dst: int
    length: int
    swap: bool = False


class SlotTable(Generic[R]):
    """Assigns KV slots; keeps decoding rows in slots ``0..D-1`` (see the module docstring)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.decoding: list[R] = []
        """Index i holds the row in slot i."""
        self.prefilling: list[R] = []
        """In admission order; slots >= len(decoding)."""

    @property
    def free(self) -> int:
        return self.slots - len(self.decoding) - len(self.prefilling)

    def __len__(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def _occupant(self, slot: int) -> R | None:
        if slot < len(self.decoding):
            return self.decoding[slot]
        return next((r for r in self.prefilling if r.slot == slot), None)

    def admit(self, row: R) -> None:
        """Give ``row`` a free slot (above the decoding rows) and queue it for prefill."""
        if self.free <= 0:
            raise RuntimeError("no free slot")
        used = {r.slot for r in self.prefilling}
        row.slot = next(s for s in range(len(self.decoding), self.slots) if s not in used)
        self.prefilling.append(row)

    def promote(self, row: R) -> list[Move]:
        """``row`` finished its prefill: it becomes decoding row D (its KV moves to slot D)."""
        self.prefilling.remove(row)
        target = len(self.decoding)
        moves = []
        if row.slot != target:
            other = self._occupant(target)
            if other is not None:  # a prefilling row sits in slot D: exchange the two
                moves.append(Move(row.slot, target, max(row.cached, other.cached), swap=True))
                other.slot = row.slot
            else:
                moves.append(Move(row.slot, target, row.cached))
            row.slot = target
        self.decoding.append(row)
        return moves

    def release(self, row: R) -> list[Move]:
        """``row`` left (finished, failed or cancelled); the last decoding row fills its slot."""
        if row in self.prefilling:
            self.prefilling.remove(row)
            return []
        index = self.decoding.index(row)
        last = self.decoding.pop()
        if last is row:
            return []
        self.decoding[index] = last
        move = Move(last.slot, index, last.cached)
        last.slot = index
        return [move]


@dataclass(frozen=True)
class Chunk:
    """Prefill positions ``start..start+length`` of one row in this step."""

    row: object
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length >= self.row.prefill_len  # type: ignore[attr-defined]


def plan_prefill(prefilling: list[R], budget: int) -> list[Chunk]:
    """Chunks for this step: rows in admission order, at most ``budget`` positions in total, a row
    only after every earlier row's remainder fits (so rows finish prefill in admission order)."""
    chunks: list[Chunk] = []
    left = budget
    for row in prefilling:
        if left <= 0:
            break
        remaining = row.prefill_len - row.cached
        take = min(remaining, left)
        chunks.append(Chunk(row, row.cached, take))
        left -= take
        if take < remaining:
            break
    return chunks
