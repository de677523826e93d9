"""Faults under steady load: a replica's actor is killed, or a worker node is lost, while closed-loop
clients keep sending non-streaming chat requests (base and an adapter). Reports failed requests
and the time until Serve is back to full strength, with the router's retry of lost replica calls
(``serve_app.ingress.retry``, the default) against the same run without it (``ATELIER_REPLICA_RETRIES=1``,
the baseline).

    python -m bench.faults replica --seconds 40 --kill-at 10     # one node, 2 replicas, one killed
    python -m bench.faults node --seconds 40 --kill-at 10        # head + worker (ray.cluster_utils), worker lost
    python -m bench.faults all                                   # both -> docs/bench/faults.{json,md}

``node``: the router is pinned to the head node and the pool runs one replica per node, so the
worker's loss takes one replica; a fresh worker joins ``--rejoin-after`` seconds later and the
time until two replicas run again is the recovery time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "faults"
POOL = "p"
RECOVERY_WAIT_S = 120.0


def build_app(config, store: str, pin_router_to_head: bool = False, one_replica_per_node: bool = False):
    """The same application as ``serve_app.app.build_from_config``, with placement constraints an
    operator adds on a multi-node cluster: the router on the head, pool replicas spread one per node."""
    from ray import serve

    from serve_app.ingress.router import Router
    from serve_app.replica.deployment import pool_deployment

    pools = {}
    for p in config.pools:
        dep = pool_deployment(p)
        if one_replica_per_node:
            dep = dep.options(max_replicas_per_node=1)
        pools[p.name] = dep.bind(p.model_dump(), store)
    actor = {"num_cpus": config.router_num_cpus}
    if pin_router_to_head:
        actor["resources"] = {"node:__internal_head__": 0.001}
    router = serve.deployment(Router).options(name="Router", num_replicas=1, ray_actor_options=actor,
                                              max_ongoing_requests=256)
    return router.bind(config.model_dump(), store, pools)


def deploy(model: str, port: int, work: Path, replicas: int, multinode: bool) -> dict:
    """Serve the app (``replicas`` pool replicas) on the running Ray; tenant ``bench`` with one adapter."""
    import httpx
    from ray import serve

    from cluster.models import resolve_model
    from cluster.registry import Registry
    from cluster.validators import install_validators
    from serve_app.config import load_app_config
    from tests.serve_fixtures import make_peft_adapter, upload_dir

    install_validators()  # publish as the service and the jobs do: deep-checked
    registry = Registry(str(work / "store"))
    _, key = registry.create_tenant("bench")
    config = load_app_config({"pools": [{"name": POOL, "model": model, "num_cpus": 0.5, "max_batch_size": 8,
                                         "batch_wait_ms": 10, "max_new_tokens": 64, "bank_poll_s": 2,
                                         "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}],
                              "rate_limit_rpm": 0, "router_num_cpus": 0.25})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(config, str(work / "store"), multinode, multinode), name=APP, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=300) as c:
        adapter = make_peft_adapter(resolve_model(model).path, work / "adapter", seed=1)
        r = upload_dir(c, key, "bench", "adapters", "pirate", adapter, description="pirate talk")
        assert r.status_code == 201, r.text
    return {"url": url, "key": key}


def live_actors() -> list:
    """Live actors of *this* Ray instance (the state API refuses to guess when the host runs several)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                       limit=1000)


def replica_actors() -> list:
    prefix = f"SERVE_REPLICA::{APP}#pool-{POOL}#"  # Serve's ReplicaID.to_full_id_str()
    return [a for a in live_actors() if (a.name or "").startswith(prefix)]


def running_replicas() -> int:
    from ray import serve

    try:
        dep = serve.status().applications[APP].deployments[f"pool-{POOL}"]
    except KeyError:
        return 0
    return int(dep.replica_states.get("RUNNING", 0))


def kill_replica() -> str:
    """ray.kill one pool replica actor, found by its Serve actor name through the GCS (no state API,
    which needs the dashboard); returns its name."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#pool-{POOL}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(prefix))
    if not names:
        raise RuntimeError(f"no live replica actor of pool-{POOL} found")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def run_scenario(kind: str, app: dict, seconds: float, kill_at: float, clients: int, replicas: int,
                 fault, rejoin=None, rejoin_after: float = 0.0) -> dict:
    """Load for ``seconds``; ``fault()`` at ``kill_at``; ``rejoin()`` ``rejoin_after`` s later."""
    from bench.load import Client, chat, run_load, summary

    specs = [Client("base" if i % 2 else "adapter", app["key"],
                    chat("base" if i % 2 else "bench/pirate", "Tell me about ships", 8)) for i in range(clients)]
    records: list = []
    start = time.monotonic()
    threads = run_load(app["url"], specs, seconds, records)
    time.sleep(kill_at)
    killed_at = time.monotonic()
    victim = fault()
    dropped_at = recovered_at = rejoined_at = None
    while time.monotonic() - start < seconds + RECOVERY_WAIT_S:  # the load may end before Serve recovers
        n = running_replicas()
        now = time.monotonic()
        if dropped_at is None and n < replicas:
            dropped_at = now
        if dropped_at is not None and recovered_at is None and n >= replicas:
            recovered_at = now
        if rejoin is not None and rejoined_at is None and now - killed_at >= rejoin_after:
            rejoin()
            rejoined_at = time.monotonic()
        if recovered_at is not None and all(not t.is_alive() for t in threads):
            break
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=180)
    window_end = (recovered_at or time.monotonic())
    return {"scenario": kind, "victim": victim, "replicas": replicas, "clients": clients, "seconds": seconds,
            "kill_at_s": kill_at, "retries": int(os.environ.get("ATELIER_REPLICA_RETRIES", "4")),
            "seen_down_after_s": round(dropped_at - killed_at, 2) if dropped_at else None,
            "rejoin_after_s": round(rejoined_at - killed_at, 2) if rejoined_at else None,
            "recovered_after_s": round(recovered_at - killed_at, 2) if recovered_at else None,
            "total": summary(records), "before": summary(records, until=killed_at),
            "fault_to_recovery": summary(records, since=killed_at - 5.0, until=window_end),
            "errors": sorted({r.error[:160] for r in records if r.status != 200})[:5]}


def replica_run(args, work: Path) -> dict:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    try:
        app = deploy(args.model, args.port, work, 2, multinode=False)
        return run_scenario("replica killed", app, args.seconds, args.kill_at, args.clients, 2, kill_replica)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        serve.shutdown()
        ray.shutdown()


def node_run(args, work: Path) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 1024**2})
    worker = cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        app = deploy(args.model, args.port, work, 2, multinode=True)
        on_worker = [a for a in replica_actors() if a.node_id == worker.node_id]
        assert len(on_worker) == 1, "the pool must run one replica on the worker node"

        def lose_worker() -> str:
            cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: a crash, not a drain
            return f"worker node {worker.node_id[:8]} (replica {on_worker[0].name})"

        def rejoin() -> None:
            cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)

        return run_scenario("worker node lost", app, args.seconds, args.kill_at, args.clients, 2, lose_worker,
                            rejoin, args.rejoin_after)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=["replica", "node", "all"])
    p.add_argument("--model", default="tiny-random", help="pool base model (catalog name or directory)")
    p.add_argument("--seconds", type=float, default=40.0, help="load duration per run")
    p.add_argument("--kill-at", type=float, default=10.0, help="seconds into the load when the fault happens")
    p.add_argument("--rejoin-after", type=float, default=8.0, help="node: seconds until a fresh worker joins")
    p.add_argument("--clients", type=int, default=4, help="closed-loop client threads")
    p.add_argument("--variants", default="retry,no-retry",
                   help="comma list: retry (ATELIER_REPLICA_RETRIES=4), no-retry (=1, the baseline)")
    p.add_argument("--port", type=int, default=18300)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from bench.common import command_line, write_results

    runs = []
    scenarios = ["replica", "node"] if args.scenario == "all" else [args.scenario]
    for scenario in scenarios:
        for variant in args.variants.split(","):
            os.environ["ATELIER_REPLICA_RETRIES"] = "4" if variant == "retry" else "1"
            work = Path(tempfile.mkdtemp(prefix=f"atelier-faults-{scenario}-"))
            result = (replica_run if scenario == "replica" else node_run)(args, work)
            result["variant"] = variant
            runs.append(result)
            print({k: result[k] for k in ("scenario", "variant", "recovered_after_s", "total")}, flush=True)
    table = [{"scenario": r["scenario"], "router retry": r["variant"], "requests": r["total"]["requests"],
              "failed": r["total"]["failed"], "failed by status": r["total"]["failed_by_status"] or "",
              "p50 ms before": r["before"]["p50_ms"], "p99 ms fault→recovery": r["fault_to_recovery"]["p99_ms"],
              "max ms fault→recovery": r["fault_to_recovery"]["max_ms"],
              "back to 2 replicas after s": r["recovered_after_s"]} for r in runs]
    notes = (f"{args.clients} closed-loop clients (half base, half adapter), non-streaming greedy chat, 8 tokens, "
             f"`{args.model}`, 2 pool replicas of 0.5 CPU. 'fault→recovery' covers requests started from 5 s before "
             "the fault until Serve reports 2 running replicas again. Load average at the end: "
             f"{tuple(round(x, 1) for x in os.getloadavg())} on 2 cores shared with other jobs.")
    name = "faults" if args.scenario == "all" else f"faults_{args.scenario}"
    _, md = write_results(Path(args.out), name, {"runs": runs, "args": vars(args)}, table,
                          "Faults under load: replica killed, worker node lost", command_line("bench.faults", argv),
                          notes)
    print(md.read_text())


if __name__ == "__main__":
    main()
