"""Publish-to-first-served-request latency of the Serve app, for new experts and new bank versions.

Every repetition publishes a *new* artifact and then sends requests (every ``--poll-ms``) until
the first one succeeds; the time from the publish call to that success is the figure. Scenarios:

* new expert, connectors published by a job (``Registry.publish``, as ``train_jobs`` do): the
  router's catalog is cached (a request just before each publish refreshes it, as under steady
  traffic); a request naming a model the cached listing lacks re-reads the registry when the
  listing is older than ``catalog_miss_refresh_s``; first ``predict``.
* new expert, connectors uploaded over HTTP (admin): the router invalidates its catalog at once;
  first chat completion.
* new bank version, adapter uploaded over HTTP: the router projects it into the bank, publishes
  and broadcasts ``reload_bank``; first chat with the new adapter.
* new bank version published by a job (``cluster.banks.add_to_bank`` into the registry, no
  broadcast); first chat with the new adapter.

Baselines, same run: warm requests (expert resident / adapter in the bank) of the same kind.
The tenant's expert is published before each repetition (an expert alone is not servable: it
needs its connectors). Connectors and experts are freshly initialised, not trained: their shapes
and file sizes are those of trained ones (``ConnectorsConfig`` defaults), and weight values do not
change load or forward time. Wall times, plus CPU time of the serving processes (router, pool
replica, HTTP proxy) per interval.

    python -m bench.serve_publish --model tiny-random --reps 5
    python -m bench.serve_publish --model smollm2-135m --reps 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServingCPU:
    """CPU seconds (user + system) used so far by this app's Serve actors and the HTTP proxy.

    Found among this driver's own descendants (a local ``ray.init`` cluster's workers are), by
    process title, so other Ray clusters on the machine are never counted."""

    def __init__(self, app: str):
        import psutil

        def title(proc) -> str:
            try:
                return " ".join(proc.cmdline())
            except psutil.Error:
                return ""

        mine = psutil.Process(os.getpid()).children(recursive=True)
        self.procs = [p for p in mine if f"ServeReplica:{app}:" in title(p) or "ProxyActor" in title(p)]
        if len(self.procs) < 3:
            raise RuntimeError(f"expected router, pool replica and proxy among this driver's processes, found "
                               f"{[title(p)[:60] for p in self.procs]}")

    def seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            t = p.cpu_times()
            total += t.user + t.system
        return total


def make_expert_pair(model, tok, resolved, schema: dict, out: Path, seed: int) -> tuple[Path, Path]:
    """Freshly initialised connectors (default sizes) + an untrained expert for ``schema``."""
    import torch

    from causal_lm import num_layers
    from llamdex.codec import FeatureCodec
    from llamdex.connectors_io import save_connectors
    from llamdex.expert import ExpertArch, ExpertSpec, build_expert, save_expert
    from llamdex.expert_spec import DPLedger
    from llamdex.pipeline import ConnectorsConfig, init_connectors
    from llamdex.prompting import answer_tokens

    codec = FeatureCodec(schema)
    cfg = ConnectorsConfig(layer=min(ConnectorsConfig.layer, num_layers(model) - 1), seed=seed)
    enc, dec, spec = init_connectors(model, codec, answer_tokens(tok, codec.class_names), cfg,
                                     model_id=resolved.id, model_hash=resolved.content_hash)
    save_connectors(enc, dec, spec, out / "connectors")
    torch.manual_seed(seed)
    arch = ExpertArch.from_schema(schema)
    ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0, sample_rate=1, steps=0, epochs=0,
                      accountant="none")
    save_expert(build_expert(arch).eval(), ExpertSpec.build(schema, arch, ledger), out / "expert")
    return out / "expert", out / "connectors"


def files_of(directory: Path) -> dict[str, bytes]:
    """The artifact files of a saved directory (PEFT's README.md is not an artifact file)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != "README.md"}


def multipart(directory: Path) -> list:
    return [("files", (name, io.BytesIO(data), "application/octet-stream")) for name, data in files_of(directory).items()]


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random", help="pool base model (catalog name or directory)")
    p.add_argument("--reps", type=int, default=5, help="new artifacts per scenario")
    p.add_argument("--warm", type=int, default=20, help="warm (baseline) requests per kind")
    p.add_argument("--poll-ms", type=float, default=20, help="pause between attempts while waiting")
    p.add_argument("--timeout-s", type=float, default=120, help="give up waiting for one artifact after this")
    p.add_argument("--catalog-ttl-s", type=float, default=2.0, help="router catalog cache (AppConfig.catalog_ttl_s)")
    p.add_argument("--catalog-miss-refresh-s", type=float, default=0.25,
                   help="router re-reads the registry for an unknown model if its listing is older than this "
                        "(AppConfig.catalog_miss_refresh_s)")
    p.add_argument("--bank-poll-s", type=float, default=2.0, help="replica bank polling (PoolConfig.bank_poll_s)")
    p.add_argument("--port", type=int, default=18950, help="Serve HTTP port of the bench cluster")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="results directory")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import httpx
    import ray
    from ray import serve

    from bench.common import summarize_ms, write_results
    from cluster.banks import add_to_bank
    from cluster.models import load_model, resolve_model
    from cluster.registry import Registry
    from cluster.validators import install_validators
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config
    from tests.serve_fixtures import make_peft_adapter

    load_start = os.getloadavg()
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved)
    schema = json.loads((ROOT / "examples" / "schemas" / "titanic.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="atelier-publish-"))
    install_validators()  # publish as the service and the jobs do: deep-checked
    registry = Registry(str(work / "store"))
    _, key = registry.create_tenant("bench")
    admin = registry.issue_key(None, scope="admin")
    registry.publish("bench", "schema", "titanic", {"schema.json": json.dumps(schema).encode()})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    config = load_app_config({"pools": [{"name": "p", "model": args.model, "num_cpus": 1,
                                         "bank_poll_s": args.bank_poll_s, "max_experts_per_replica": 4,
                                         "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
                              "rate_limit_rpm": 0, "catalog_ttl_s": args.catalog_ttl_s,
                              "catalog_miss_refresh_s": args.catalog_miss_refresh_s})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_from_config(config, str(work / "store")), name="publish", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300)
    auth, admin_auth = {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {admin}"}
    cpu = ServingCPU("publish")
    handle = serve.get_deployment_handle("pool-p", "publish")
    question = "A 30 year old man in third class paid 7.25 pounds. Did the passenger survive the sinking?"

    def chat(model_id: str) -> httpx.Response:
        return client.post("/v1/chat/completions", headers=auth, json={
            "model": model_id, "messages": [{"role": "user", "content": question}], "max_tokens": 1,
            "temperature": 0})

    def predict(name: str) -> httpx.Response:
        return client.post(f"/v1/experts/bench/{name}/predict", headers=auth, json={"question": question})

    def warm_catalog() -> None:
        """A request just before a publish, as under steady traffic: the router's catalog cache is fresh,
        so a job's publish becomes visible only when it expires."""
        assert client.get("/v1/models", headers=auth).status_code == 200

    def timed(fn) -> tuple[float, float]:
        """(wall seconds, serving CPU seconds) of one call that must succeed."""
        c, t = cpu.seconds(), time.perf_counter()
        r = fn()
        assert r.status_code == 200, r.text
        return time.perf_counter() - t, cpu.seconds() - c

    def until_ok(fn, t0: float, c0: float) -> dict:
        """Attempts until the first success: times from ``t0`` (the publish call), and the success alone."""
        attempts = 0
        while True:
            attempts += 1
            t = time.perf_counter()
            r = fn()
            if r.status_code == 200:
                done = time.perf_counter()
                return {"total_s": done - t0, "first_ok_request_s": done - t, "attempts": attempts,
                        "serving_cpu_s": cpu.seconds() - c0}
            if r.status_code not in (404, 503):
                raise AssertionError(f"unexpected {r.status_code}: {r.text}")
            if time.perf_counter() - t0 > args.timeout_s:
                raise TimeoutError(f"not served within {args.timeout_s} s: {r.text}")
            time.sleep(args.poll_ms / 1000)

    results: dict[str, list[dict]] = {k: [] for k in ("expert_job", "expert_http", "bank_http", "bank_job")}
    loads: list[float] = []
    for i in range(args.reps):
        for path in ("job", "http"):
            name = f"x{path}{i}"
            expert_dir, connectors_dir = make_expert_pair(model, tok, resolved, schema, work / name, seed=i)
            r = client.post(f"/v1/tenants/bench/experts/{name}", headers=auth, files=multipart(expert_dir))
            assert r.status_code == 201, r.text
            warm_catalog()
            c0, t0 = cpu.seconds(), time.perf_counter()
            if path == "job":
                registry.publish("bench", "connectors", name, files_of(connectors_dir))
                out = until_ok(lambda n=name: predict(n), t0, c0)
            else:
                r = client.post(f"/v1/tenants/bench/connectors/{name}", headers=admin_auth,
                                files=multipart(connectors_dir))
                assert r.status_code == 201, r.text
                out = until_ok(lambda n=name: chat(f"bench/{n}"), t0, c0)
            loads.append(handle.stats.remote().result().expert_last_load_s)
            results[f"expert_{path}"].append(out)
        for path in ("http", "job"):
            name = f"a{path}{i}"
            adapter = make_peft_adapter(resolved.path, work / name, seed=100 + i)
            warm_catalog()
            c0, t0 = cpu.seconds(), time.perf_counter()
            if path == "http":
                r = client.post(f"/v1/tenants/bench/adapters/{name}", headers=auth, files=multipart(adapter))
                assert r.status_code == 201, r.text
            else:
                registry.publish("bench", "adapter", name, files_of(adapter))
                add_to_bank(registry, "p", resolved, "bench", name)
            results[f"bank_{path}"].append(until_ok(lambda n=name: chat(f"bench/{n}"), t0, c0))

    warm = {"predict": [timed(lambda: predict("xjob0")) for _ in range(args.warm)],
            "expert_chat": [timed(lambda: chat("bench/xhttp0")) for _ in range(args.warm)],
            "adapter_chat": [timed(lambda: chat("bench/ahttp0")) for _ in range(args.warm)]}
    final = handle.stats.remote().result().model_dump()
    serve.shutdown()
    ray.shutdown()

    def row(label: str, runs: list[dict], baseline: str) -> dict:
        total = [r["total_s"] for r in runs]
        base = statistics.median(w for w, _ in warm[baseline])
        return {"scenario": label, **summarize_ms(total),
                "first_ok_request_p50_ms": median_ms([r["first_ok_request_s"] for r in runs]),
                "attempts_p50": statistics.median(r["attempts"] for r in runs),
                "serving_cpu_p50_ms": median_ms([r["serving_cpu_s"] for r in runs]),
                "vs_warm_p50": round(statistics.median(total) / base, 1)}

    def warm_row(label: str, kind: str) -> dict:
        return {"scenario": label, **summarize_ms([w for w, _ in warm[kind]]), "first_ok_request_p50_ms": "",
                "attempts_p50": "", "serving_cpu_p50_ms": median_ms([c for _, c in warm[kind]]), "vs_warm_p50": 1.0}

    table = [
        warm_row("warm predict, expert resident (baseline)", "predict"),
        warm_row("warm chat, expert resident (baseline)", "expert_chat"),
        warm_row("warm chat, adapter in bank (baseline)", "adapter_chat"),
        row("new expert: job publishes connectors → first predict", results["expert_job"], "predict"),
        row("new expert: connectors uploaded (HTTP) → first chat", results["expert_http"], "expert_chat"),
        row("new bank: adapter uploaded (HTTP) → first chat", results["bank_http"], "adapter_chat"),
        row("new bank: job publishes bank → first chat", results["bank_job"], "adapter_chat"),
    ]
    load_end = os.getloadavg()
    command = f"python -m bench.serve_publish --model {args.model} --reps {args.reps}"
    notes = (
        f"`{args.model}`, one pool replica (1 CPU, 1 torch thread), requests generate 1 token. Times run from the "
        "publish call to the first 200 response (HTTP uploads: from sending the upload, so they include "
        "validation and, for adapters, the projection into the bank and the broadcast; the job bank path: from "
        "publishing the adapter, so it includes the job's projection and bank publish); attempts every "
        f"{args.poll_ms:g} ms; `vs_warm_p50` = median / the warm median of the same request kind. Router catalog "
        f"TTL {args.catalog_ttl_s:g} s, re-read on a request for a model it lacks once older than "
        f"{args.catalog_miss_refresh_s:g} s (that bounds the job paths; HTTP uploads invalidate it at once), "
        f"replica bank polling {args.bank_poll_s:g} s (replicas also reload on demand "
        "when a request names an adapter they lack). `first_ok_request_p50_ms` is the successful request alone: "
        "for experts it includes the replica's load of expert + connectors "
        f"(median {median_ms([x for x in loads if x is not None])} ms inside the replica). `serving_cpu_p50_ms`: "
        "CPU time of router + pool replica + HTTP proxy over the interval. Connectors and experts are freshly "
        "initialised with the default sizes (not trained: values do not change load or forward time). "
        f"Machine load average (1/5/15 min) {tuple(round(x, 1) for x in load_start)} at start, "
        f"{tuple(round(x, 1) for x in load_end)} at end, on 2 cores shared with other jobs.")
    payload = {"args": vars(args), "runs": results, "warm": {k: [{"wall_s": w, "serving_cpu_s": c} for w, c in v]
                                                             for k, v in warm.items()},
               "replica_expert_load_s": loads, "replica_final_stats": final,
               "loadavg_start": load_start, "loadavg_end": load_end}
    _, md_path = write_results(Path(args.out), f"serve_publish_{Path(args.model).name}", payload, table,
                               f"Serve: publish → first served request ({args.model})", command, notes)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
