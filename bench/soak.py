"""Soak and flood: the service under sustained mixed multi-tenant load, and one tenant's flood.

``soak``: tens of closed-loop clients from several tenants send a mix of base chat, adapter chat,
expert chat and expert predictions for several minutes. Reports errors (target 0), p50/p99 per
kind, and every pool replica's RSS sampled through the run (start/end: memory must stay flat).

``flood``: tenant B's latency alone (one closed-loop client, the baseline) and then the same
client while tenant A floods the same pool with many concurrent requests, under its rate limit.
Reports B's p99 loaded / unloaded (target <= 2: batches filled fairly across tenants, not FIFO),
once per router ``tenant_max_in_flight`` setting in ``--tenant-max-in-flight`` (0 = no cap: the
named baseline, same run). B's client runs in its own process (as another user's would), so its
latency is not measured behind the flooders' threads.

    python -m bench.soak soak --seconds 300 --clients 24
    python -m bench.soak flood --seconds 60 --flood-clients 24
    python -m bench.soak all                 # both -> docs/bench/soak.{json,md}
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "soak"
QUESTION = "A 30 year old man, fare 7.25 pounds, travelling alone. Did the passenger survive?"


def replica_rss() -> dict[str, int]:
    """RSS (bytes) of every pool replica process of this app, by pid (Ray titles actor processes
    ``ray::ServeReplica:<app>:<deployment>``)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith(f"ray::ServeReplica:{APP}:pool-"):
                out[f"{title.split()[0]}[{proc.info['pid']}]"] = proc.memory_info().rss
        except psutil.Error:
            pass
    return out


def deploy(model: str, port: int, work: Path, tenants: int, with_expert: bool, replicas: int,
           rate_limit_rpm: int, max_ongoing: int = 64, tenant_max_in_flight: int | None = None) -> dict:
    """The app on one pool of ``model``; ``tenants`` tenants with an adapter each, t0 also an expert;
    ``tenant_max_in_flight`` None keeps the router's default."""
    import httpx
    import ray
    from ray import serve

    from cluster.models import resolve_model
    from cluster.registry import Registry
    from cluster.validators import install_validators
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config
    from tests.security_fixtures import SCHEMA
    from tests.serve_fixtures import make_peft_adapter, train_tiny_connectors, upload_dir

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    install_validators()  # publish as the service and the jobs do: deep-checked
    registry = Registry(str(work / "store"))
    admin = registry.issue_key(None, scope="admin")
    keys = {f"t{i}": registry.create_tenant(f"t{i}")[1] for i in range(tenants)}
    config = load_app_config({"pools": [{"name": "p", "model": model, "num_cpus": 1.0 / replicas,
                                         "max_batch_size": 8, "batch_wait_ms": 10, "max_new_tokens": 64,
                                         "max_ongoing_requests": max_ongoing,
                                         "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}],
                              "rate_limit_rpm": rate_limit_rpm, "router_num_cpus": 0.25,
                              **({} if tenant_max_in_flight is None else {"tenant_max_in_flight": tenant_max_in_flight})})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_from_config(config, str(work / "store")), name=APP, route_prefix="/")
    resolved = resolve_model(model)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=300) as c:
        for i, (tenant, key) in enumerate(keys.items()):
            r = upload_dir(c, key, tenant, "adapters", "style", make_peft_adapter(resolved.path, work / tenant, i),
                           description=f"tenant {tenant} style")
            assert r.status_code == 201, r.text
        if with_expert:
            expert_dir, connectors_dir, _ = train_tiny_connectors(resolved, SCHEMA, work / "trained")
            assert c.post("/v1/tenants/t0/schemas/titanic", json=SCHEMA,
                          headers={"Authorization": f"Bearer {keys['t0']}"}).status_code == 201
            assert upload_dir(c, keys["t0"], "t0", "experts", "survival", expert_dir).status_code == 201
            assert upload_dir(c, admin, "t0", "connectors", "survival", connectors_dir).status_code == 201
    return {"url": url, "keys": keys}


def soak(args, work: Path) -> dict:
    from ray import serve

    from bench.load import Client, chat, predict, run_load, summary

    app = deploy(args.model, args.port, work, args.tenants, True, args.replicas, 0, args.max_ongoing)
    try:
        keys = app["keys"]
        mix = []
        for i in range(args.clients):
            tenant = f"t{i % args.tenants}"
            kind = ("base", "adapter", "expert-chat", "expert-predict")[i % 4]
            if kind.startswith("expert"):
                tenant = "t0"
            body = {"base": chat("base", "Tell me about the sea", args.max_tokens),
                    "adapter": chat(f"{tenant}/style", "Tell me about the sea", args.max_tokens),
                    "expert-chat": chat("t0/survival", QUESTION, args.max_tokens),
                    "expert-predict": predict("t0/survival", QUESTION)}[kind]
            mix.append(Client(kind, keys[tenant], body))
        rss = [(0.0, replica_rss())]
        records: list = []
        start = time.monotonic()
        threads = run_load(app["url"], mix, args.seconds, records)
        while any(t.is_alive() for t in threads):
            time.sleep(min(10.0, max(0.5, args.seconds / 10)))
            rss.append((round(time.monotonic() - start, 1), replica_rss()))
        rss.append((round(time.monotonic() - start, 1), replica_rss()))
        first, last = rss[0][1], rss[-1][1]
        return {"mode": "soak", "clients": args.clients, "tenants": args.tenants, "seconds": args.seconds,
                "total": summary(records), "by_kind": {k: summary(records, label=k) for k in
                                                       ("base", "adapter", "expert-chat", "expert-predict")},
                "rss_mb_start": {k: round(v / 2**20, 1) for k, v in first.items()},
                "rss_mb_end": {k: round(v / 2**20, 1) for k, v in last.items()},
                "rss_mb_samples": [(t, {k: round(v / 2**20, 1) for k, v in s.items()}) for t, s in rss],
                "errors": sorted({r.error[:160] for r in records if r.status != 200})[:5]}
    finally:
        serve.shutdown()
        import ray
        ray.shutdown()


def flood(args, work: Path, cap: int) -> dict:
    """B alone, then B during A's flood, on a fresh app whose router caps each tenant at ``cap``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ray import serve

    from bench.load import Client, chat, chat_client_records, run_load, summary

    app = deploy(args.model, args.port, work, 2, False, 1, args.rate_limit_rpm, args.max_ongoing, cap)
    try:
        keys = app["keys"]
        def b_for(seconds: float) -> tuple:  # tenant B's client, run in the other process
            return app["url"], "B", keys["t1"], "t1/style", seconds, args.max_tokens

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as other_user:
            other_user.submit(chat_client_records, *b_for(1.0)).result()  # warm the process and the route
            records = other_user.submit(chat_client_records, *b_for(args.seconds)).result()
            unloaded = summary(records, label="B")
            flooders = [Client("A", keys["t0"], chat("t0/style", "Tell me about the sea", args.max_tokens))
                        for _ in range(args.flood_clients)]
            records2: list = []
            stop = threading.Event()
            flood_threads = run_load(app["url"], flooders, args.seconds + 10, records2, stop)
            time.sleep(5.0)  # let the flood fill the queues first
            records2 += other_user.submit(chat_client_records, *b_for(args.seconds)).result()
        stop.set()
        for t in flood_threads:
            t.join(timeout=300)
        loaded, a = summary(records2, label="B"), summary(records2, label="A")
        ratio = loaded["p99_ms"] / unloaded["p99_ms"] if loaded["p99_ms"] and unloaded["p99_ms"] else None
        a_rpm = a["requests"] / ((args.seconds + 10) / 60)
        return {"mode": "flood", "tenant_max_in_flight": cap, "seconds": args.seconds,
                "flood_clients": args.flood_clients,
                "rate_limit_rpm": args.rate_limit_rpm, "a_requests_per_minute": round(a_rpm, 1),
                "b_unloaded": unloaded, "b_loaded": loaded, "a": a,
                "b_p99_ratio": round(ratio, 2) if ratio else None,
                "errors": sorted({r.error[:160] for r in records + records2 if r.status != 200})[:5]}
    finally:
        serve.shutdown()
        import ray
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["soak", "flood", "all"])
    p.add_argument("--model", default="tiny-random", help="pool base model (catalog name or directory)")
    p.add_argument("--seconds", type=float, default=300.0, help="soak: load duration; flood: per phase")
    p.add_argument("--clients", type=int, default=24, help="soak: closed-loop clients")
    p.add_argument("--tenants", type=int, default=4, help="soak: tenants (t0 also owns an expert)")
    p.add_argument("--replicas", type=int, default=2, help="soak: pool replicas")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per chat request")
    p.add_argument("--flood-clients", type=int, default=24, help="flood: tenant A's concurrent clients")
    p.add_argument("--flood-seconds", type=float, default=60.0, help="flood: per phase (all mode)")
    p.add_argument("--rate-limit-rpm", type=int, default=60_000, help="flood: per-key rate limit (A stays under)")
    p.add_argument("--max-ongoing", type=int, default=64,
                   help="the pool's max_ongoing_requests: requests past it wait, in arrival order, at Serve's "
                        "handle; below it they reach the replica's per-tenant fair queue")
    p.add_argument("--tenant-max-in-flight", default="0,2",
                   help="flood: comma-separated router tenant_max_in_flight settings, one flood each (0 = no cap)")
    p.add_argument("--port", type=int, default=18400)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from bench.common import command_line, write_results

    results, table = [], []
    if args.mode in ("soak", "all"):
        r = soak(args, Path(tempfile.mkdtemp(prefix="atelier-soak-")))
        results.append(r)
        for kind, s in [("all", r["total"]), *r["by_kind"].items()]:
            table.append({"run": f"soak {args.seconds:g} s, {args.clients} clients, {args.tenants} tenants",
                          "traffic": kind, "requests": s["requests"], "errors": s["failed"],
                          "p50 ms": s["p50_ms"], "p99 ms": s["p99_ms"]})
        print(r["total"], r["rss_mb_start"], r["rss_mb_end"], flush=True)
    if args.mode in ("flood", "all"):
        if args.mode == "all":
            args.seconds = args.flood_seconds
        for cap in [int(c) for c in args.tenant_max_in_flight.split(",") if c.strip()]:
            r = flood(args, Path(tempfile.mkdtemp(prefix="atelier-flood-")), cap)
            results.append(r)
            run = f"flood {args.seconds:g} s, tenant_max_in_flight {cap}"
            for label, s in (("B alone (baseline)", r["b_unloaded"]), ("B during A's flood", r["b_loaded"]),
                             (f"A's flood ({args.flood_clients} clients)", r["a"])):
                table.append({"run": run, "traffic": label, "requests": s["requests"], "errors": s["failed"],
                              "p50 ms": s["p50_ms"], "p99 ms": s["p99_ms"]})
            print("tenant_max_in_flight", cap, "B p99 ratio", r["b_p99_ratio"], flush=True)
    soak_r = next((r for r in results if r["mode"] == "soak"), None)
    notes = []
    if soak_r:
        notes.append(f"Soak replica RSS (MB) start {soak_r['rss_mb_start']} -> end {soak_r['rss_mb_end']}.")
    for r in (r for r in results if r["mode"] == "flood"):
        notes.append(f"Flood, tenant_max_in_flight {r['tenant_max_in_flight']}: tenant B's p99 during A's flood / "
                     f"alone = {r['b_p99_ratio']} (target <= 2); A sent {r['a_requests_per_minute']} requests/min "
                     f"under a limit of {r['rate_limit_rpm']}.")
    notes.append(f"`{args.model}`, closed-loop clients, greedy chat of {args.max_tokens} tokens, pool "
                 f"max_batch_size 8, max_ongoing_requests {args.max_ongoing}. Load average at the "
                 f"end: {tuple(round(x, 1) for x in os.getloadavg())} on 2 cores shared with other jobs.")
    name = "soak" if args.mode == "all" else f"soak_{args.mode}"
    _, md = write_results(Path(args.out), name, {"runs": results, "args": vars(args)}, table,
                          "Soak and flood", command_line("bench.soak", argv), " ".join(notes))
    print(md.read_text())


if __name__ == "__main__":
    main()
