"""The registry lock (cluster.lease) with real processes on a real directory: a stale lock is taken
over by exactly one of several racing processes, an unreadable lock file obeys the deadline."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cluster.registry import Registry, RegistryError

RACER = textwrap.dedent("""
    import json, os, sys, time
    from cluster.registry import Registry
    from cluster.storage import Storage
    store, out, go = sys.argv[1], sys.argv[2], sys.argv[3]
    read_bytes = Storage.read_bytes
    def slow_read(self, rel):  # object-store latency: widens any check-then-act window
        data = read_bytes(self, rel)
        if rel.startswith("locks/"):
            time.sleep(0.02)
        return data
    Storage.read_bytes = slow_read
    reg = Registry(store)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    with reg.lock("bank-race", stale_after_s=30, wait_s=120):
        entered = time.time()
        counter = os.path.join(store, "counter")
        value = int(open(counter).read()) if os.path.exists(counter) else 0
        time.sleep(0.05)  # a read-modify-write that two holders at once would corrupt
        with open(counter, "w") as f:
            f.write(str(value + 1))
        left = time.time()
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "entered": entered, "left": left}, f)
""")


def _stale_lock(store: str, name: str, age_s: float = 1000.0) -> None:
    path = os.path.join(store, "locks", name, f"{1:012d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"token": "dead-holder", "at": time.time() - age_s, "released": False}, f)


def test_processes_racing_for_a_stale_lock_hold_it_one_at_a_time(tmp_path):
    store = str(tmp_path / "store")
    Registry(store)
    _stale_lock(store, "bank-race")
    racers, go = 6, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, store, str(tmp_path / f"out{i}.json"), str(go)],
                              stdout=subprocess.PIPE, text=True) for i in range(racers)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # every racer sees the same stale lock at (nearly) the same moment
    assert all(p.wait(120) == 0 for p in procs)
    spans = sorted((json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(racers)),
                   key=lambda s: s["entered"])
    overlaps = [(a["pid"], b["pid"]) for a, b in zip(spans, spans[1:], strict=False) if b["entered"] < a["left"]]
    counter = int((tmp_path / "store" / "counter").read_text())
    print(f"racers={racers} counter={counter} overlaps={overlaps}")
    assert not overlaps and counter == racers
    gens = sorted(os.listdir(tmp_path / "store" / "locks" / "bank-race"))
    assert len(gens) <= 2 and int(gens[-1][:-5]) == racers + 1  # one generation per holder, old ones cleaned


def test_unreadable_lock_file_respects_the_deadline(tmp_path):
    store = str(tmp_path / "store")
    reg = Registry(store)
    path = tmp_path / "store" / "locks" / "bank-x" / f"{1:012d}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00garbage{")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="unreadable lock file"):
        with reg.lock("bank-x", stale_after_s=60, wait_s=0.5):
            pass
    assert time.monotonic() - started < 3
    old = time.time() - 120  # the same garbage, untouched for 2 minutes: a crashed writer's, taken over
    os.utime(path, (old, old))
    with reg.lock("bank-x", stale_after_s=60, wait_s=0.5):
        assert sorted(p.name for p in path.parent.iterdir())[-1] == f"{2:012d}.json"


def test_live_holder_blocks_until_released_then_next_generation(tmp_path):
    reg = Registry(str(tmp_path / "store"))
    entered = threading.Event()
    release = threading.Event()

    def holder():
        with reg.lock("bank-y"):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(10)
    with pytest.raises(RegistryError, match="held by token"):
        with reg.lock("bank-y", wait_s=0.3):
            pass
    release.set()
    t.join()
    with reg.lock("bank-y", wait_s=5):
        gens = sorted(os.listdir(tmp_path / "store" / "locks" / "bank-y"))
    assert gens == [f"{1:012d}.json", f"{2:012d}.json"]
    assert json.loads((tmp_path / "store" / "locks" / "bank-y" / gens[-1]).read_text())["released"]


def test_holder_that_overran_its_lease_does_not_release_the_new_one(tmp_path):
    reg = Registry(str(tmp_path / "store"))
    taken = threading.Event()

    def slow_holder():
        with reg.lock("bank-z", stale_after_s=0.2):
            time.sleep(0.5)
            assert taken.wait(10)

    t = threading.Thread(target=slow_holder)
    t.start()
    time.sleep(0.05)
    with reg.lock("bank-z", stale_after_s=0.2, wait_s=5):
        taken.set()
        t.join()  # the overrunning holder "releases" while we hold the lease
        gens = sorted(os.listdir(tmp_path / "store" / "locks" / "bank-z"))
        current = json.loads((tmp_path / "store" / "locks" / "bank-z" / gens[-1]).read_text())
        assert not current["released"], "the old holder's release must not free the new holder's lease"
