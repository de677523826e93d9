"""Scheduling policy (pure Python): fair admission across tenants, slot bookkeeping, prefill budget."""

from __future__ import annotations

import random
from dataclasses import dataclass

from serve_app.replica.scheduler import FairQueue, SlotTable, plan_prefill


@dataclass(eq=False)
class Row:
    tenant: str
    prefill_len: int = 10
    slot: int = -1
    cached: int = 0
    name: str = ""


def test_one_tenants_flood_does_not_starve_another():
    q: FairQueue[Row] = FairQueue()
    for i in range(100):
        q.push(Row("flood", name=f"f{i}"))
    q.push(Row("quiet", name="q0"))
    q.push(Row("other", name="o0"))
    order = [q.pop().name for _ in range(6)]
    assert order[:3] == ["f0", "q0", "o0"]  # FIFO would serve "q0" 101st
    assert order[3:] == ["f1", "f2", "f3"]
    assert len(q) == 96


def test_round_robin_keeps_each_tenants_order_and_drops_cancelled():
    q: FairQueue[Row] = FairQueue()
    rows = [Row(t, name=f"{t}{i}") for i in range(3) for t in "abc"]
    for r in rows:
        q.push(r)
    dropped = q.remove_if(lambda r: r.name == "b1")
    assert [r.name for r in dropped] == ["b1"]
    served = []
    while (r := q.pop()) is not None:
        served.append(r.name)
    assert served == ["a0", "b0", "c0", "a1", "b2", "c1", "a2", "c2"]


def test_slot_table_keeps_decoding_rows_contiguous():
    """Random admissions, promotions and releases: decoding rows always occupy slots 0..D-1, every
    row has its own slot, and replaying the returned moves on a model of the cache keeps every
    row's contents in its slot."""
    rng = random.Random(0)
    table: SlotTable[Row] = SlotTable(6)
    cache: dict[int, str] = {}  # slot -> owner name (what the KV buffer holds)
    rows, n = [], 0

    def apply(moves):
        for mv in moves:
            if mv.swap:
                cache[mv.src], cache[mv.dst] = cache.get(mv.dst), cache.get(mv.src)
            else:
                cache[mv.dst] = cache.get(mv.src)

    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and table.free:
            r = Row("t", name=f"r{n}", cached=rng.randint(1, 9))
            n += 1
            table.admit(r)
            cache[r.slot] = r.name
            rows.append(r)
        elif op < 0.7 and table.prefilling:
            apply(table.promote(rng.choice(table.prefilling[:1])))
        elif rows:
            r = rng.choice(rows)
            rows.remove(r)
            apply(table.release(r))
        assert [r.slot for r in table.decoding] == list(range(len(table.decoding)))
        slots = [r.slot for r in table.decoding + table.prefilling]
        assert len(set(slots)) == len(slots) and all(0 <= s < 6 for s in slots)
        assert all(r.slot >= len(table.decoding) for r in table.prefilling)
        assert all(cache[r.slot] == r.name for r in table.decoding + table.prefilling)


def test_prefill_plan_respects_the_budget_and_admission_order():
    a, b, c = Row("t", prefill_len=300), Row("t", prefill_len=20), Row("t", prefill_len=5)
    chunks = plan_prefill([a, b, c], budget=128)
    assert [(ch.row, ch.start, ch.length) for ch in chunks] == [(a, 0, 128)]
    a.cached = 256
    chunks = plan_prefill([a, b, c], budget=128)
    assert [(ch.start, ch.length, ch.completes) for ch in chunks] == [(256, 44, True), (0, 20, True), (0, 5, True)]
    assert sum(ch.length for ch in chunks) <= 128
