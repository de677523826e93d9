"""Closed-loop HTTP load for the fault, soak and flood benchmarks: N client threads, each sending
its next request as soon as the previous one is answered, every request recorded with its
start/end time and status, so a run can be cut into windows (before / during / after a fault)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.common import percentile


@dataclass(frozen=True)
class Record:
    client: int
    label: str  # what the client sends (e.g. "acme:adapter")
    started: float  # time.monotonic()
    ended: float
    status: int  # HTTP status, 0 for a transport error
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class Client:
    """One closed-loop client: ``body(i)`` gives the i-th request's (path, JSON body)."""

    label: str
    key: str
    body: Callable[[int], tuple[str, dict]]
    think_s: float = 0.0


def run_load(base_url: str, clients: list[Client], seconds: float, records: list[Record],
             stop: threading.Event | None = None, timeout_s: float = 120.0) -> list[threading.Thread]:
    """Start the clients (daemon threads) for ``seconds`` or until ``stop``; records are appended."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + seconds

    def loop(n: int, spec: Client) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                path, body = spec.body(i)
                t0 = time.monotonic()
                try:
                    r = http.post(path, json=body, headers={"Authorization": f"Bearer {spec.key}"})
                    status, error = r.status_code, "" if r.status_code == 200 else r.text[:300]
                except httpx.HTTPError as exc:
                    status, error = 0, repr(exc)[:300]
                records.append(Record(n, spec.label, t0, time.monotonic(), status, error))
                i += 1
                if spec.think_s:
                    time.sleep(spec.think_s)

    threads = [threading.Thread(target=loop, args=(n, c), daemon=True) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    return threads


def chat_client_records(base_url: str, label: str, key: str, model: str, seconds: float, max_tokens: int
                        ) -> list[Record]:
    """One closed-loop chat client of ``model`` for ``seconds``, run to the end; its records. Plain
    arguments, so another process can run it (a user whose latency is not measured behind other
    clients' threads)."""
    records: list[Record] = []
    for t in run_load(base_url, [Client(label, key, chat(model, "Tell me about the sea", max_tokens))], seconds,
                      records):
        t.join()
    return records


def summary(records: list[Record], label: str | None = None, since: float | None = None,
            until: float | None = None) -> dict:
    """Count, errors by status and latency percentiles of the records started in [since, until)."""
    rows = [r for r in records if (label is None or r.label == label)
            and (since is None or r.started >= since) and (until is None or r.started < until)]
    ok = [r.seconds * 1000 for r in rows if r.status == 200]
    failed = Counter(r.status for r in rows if r.status != 200)
    return {"requests": len(rows), "ok": len(ok), "failed": sum(failed.values()),
            "failed_by_status": {str(k): v for k, v in sorted(failed.items())},
            "p50_ms": round(percentile(ok, 50), 1) if ok else None,
            "p99_ms": round(percentile(ok, 99), 1) if ok else None,
            "max_ms": round(max(ok), 1) if ok else None}


def chat(model: str, content: str, max_tokens: int) -> Callable[[int], tuple[str, dict]]:
    """A body factory: greedy chat completions of ``model``."""
    def body(i: int) -> tuple[str, dict]:
        return "/v1/chat/completions", {"model": model, "max_tokens": max_tokens, "temperature": 0,
                                        "messages": [{"role": "user", "content": f"{content} (#{i})"}]}
    return body


def predict(model: str, question: str) -> Callable[[int], tuple[str, dict]]:
    """A body factory: expert predictions of ``model`` (``tenant/name``)."""
    def body(i: int) -> tuple[str, dict]:
        return f"/v1/experts/{model}/predict", {"question": question}
    return body
