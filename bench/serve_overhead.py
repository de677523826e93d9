"""Router overhead and publish-to-serve latency of the Serve app.

Baseline: the same generation request sent straight to the pool replica through a Serve
``DeploymentHandle`` (no HTTP, no auth, no routing). Measured: the full path a client takes —
HTTP → Router (auth, catalog, routing) → replica. Reports p50/p90/p99 of both and the
difference, plus the time from uploading a new adapter (a new bank version) to the first
request that uses it, and from publishing a new bank by a job to replicas serving it.

    python -m bench.serve_overhead --model tiny-random --requests 200
    python -m bench.serve_overhead --model smollm2-135m --requests 100
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="pool base model (catalog name or directory)")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per path")
    p.add_argument("--max-tokens", type=int, default=1, help="generated tokens per request (1 isolates overhead)")
    p.add_argument("--port", type=int, default=18900)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import httpx
    import ray
    from ray import serve

    from bench.common import summarize_ms, write_results
    from cluster.models import resolve_model
    from cluster.registry import Registry
    from cluster.validators import install_validators
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config
    from serve_app.wire import GenerationRequest
    from tests.serve_fixtures import make_peft_adapter, upload_dir

    work = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    install_validators()  # publish as the service and the jobs do: deep-checked
    registry = Registry(str(work / "store"))
    _, key = registry.create_tenant("bench")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    config = load_app_config({"pools": [{"name": "p", "model": args.model, "num_cpus": 1, "bank_poll_s": 0.5,
                                         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
                              "rate_limit_rpm": 0, "router_num_cpus": 0.25})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_from_config(config, str(work / "store")), name="bench", route_prefix="/")
    handle = serve.get_deployment_handle("pool-p", "bench")
    messages = [{"role": "user", "content": "Say one word."}]
    body = {"model": "base", "messages": messages, "max_tokens": args.max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300)

    def direct() -> float:
        t = time.perf_counter()
        out = handle.generate.remote(GenerationRequest(request_id="b", messages=messages, max_tokens=args.max_tokens,
                                                       temperature=0)).result()
        assert out.error is None, out
        return time.perf_counter() - t

    def routed() -> float:
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    for _ in range(10):  # warm up both paths
        direct()
        routed()
    d, h = [], []
    for i in range(args.requests):  # interleave so machine noise hits both alike
        (d if i % 2 == 0 else h).append(direct() if i % 2 == 0 else routed())
        (h if i % 2 == 0 else d).append(routed() if i % 2 == 0 else direct())
    sd, sh = summarize_ms(d), summarize_ms(h)

    # Publish → first served request: a tenant uploads an adapter over HTTP.
    model_path = resolve_model(args.model).path
    upload_s, first_s = [], []
    for i in range(3):
        adapter = make_peft_adapter(model_path, work / f"a{i}", seed=i)
        t = time.perf_counter()
        r = upload_dir(client, key, "bench", "adapters", f"a{i}", adapter, description=f"adapter {i}")
        assert r.status_code == 201, r.text
        upload_s.append(time.perf_counter() - t)
        while True:
            r = client.post("/v1/chat/completions", headers=headers, json={**body, "model": f"bench/a{i}"})
            if r.status_code == 200:
                break
            time.sleep(0.05)
        first_s.append(time.perf_counter() - t)

    # A bank published by a job (no broadcast): replicas learn it by polling the registry.
    from cluster.banks import publish_bank, read_bank

    bank, version = read_bank(registry, "p")
    poll_s = []
    for _ in range(3):
        t = time.perf_counter()
        new_version = publish_bank(registry, "p", bank, {"bench": True})
        while handle.stats.remote().result().bank_version != new_version:
            time.sleep(0.05)
        poll_s.append(time.perf_counter() - t)
    serve.shutdown()
    ray.shutdown()

    overhead = {k: round(sh[k] - sd[k], 2) for k in ("p50_ms", "p90_ms", "p99_ms")}
    table = [
        {"path": "replica via DeploymentHandle (baseline)", **sd},
        {"path": "HTTP → Router → replica", **sh},
        {"path": "router overhead (difference)", "n": "", **overhead, "mean_ms": round(sh["mean_ms"] - sd["mean_ms"], 2)},
        {"path": "upload adapter → bank published (HTTP 201)", **summarize_ms(upload_s)},
        {"path": "upload adapter → first served request", **summarize_ms(first_s)},
        {"path": "job publishes bank → replica serves it (poll)", **summarize_ms(poll_s)},
    ]
    command = f"python -m bench.serve_overhead --model {args.model} --requests {args.requests}"
    notes = (f"Each request generates {args.max_tokens} token(s) on `{args.model}`, so the difference between the "
             "two paths is the router's cost: HTTP parsing, key check, catalog lookup, a second Serve hop. "
             f"Ratio of medians (routed / direct): {sh['p50_ms'] / sd['p50_ms']:.2f}. Replica bank polling "
             "interval 0.5 s. Publish-to-first-request for new experts and banks, with more repetitions and "
             "serving CPU time: bench/serve_publish.py (docs/bench/serve_publish_*.md). Machine load average "
             f"(1/5/15 min) at the end: {tuple(round(x, 1) for x in os.getloadavg())}, 2 cores shared with other jobs.")
    json_path, md_path = write_results(Path(args.out), "serve_overhead",
                                       {"direct": sd, "routed": sh, "overhead": overhead, "upload_s": upload_s,
                                        "first_request_s": first_s, "bank_poll_s": poll_s, "args": vars(args),
                                        "bank_version_start": version},
                                       table, "Serve: router overhead and publish-to-serve latency", command, notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
