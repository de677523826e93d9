"""Serving at scale: every contender, same machine, same run, same driver.

    python -m bench.serving                       # the full run -> docs/bench/serving.{md,json,png}
    python -m bench.serving --smoke --out /tmp/x  # CI smoke: tiny model, a few requests, no vLLM

Contenders (``bench/serving_setup.py`` builds them behind the one Engine protocol):

* ``torch-base`` / ``vllm-base`` — the base model alone on each engine (the ceiling is the faster);
* ``hf-cb-base`` — the base model on transformers' ContinuousBatchingManager (for reference);
* ``torch-bank`` — Atelier's torch pool: continuous batching + the compressed bank (per-row adapters);
* ``vllm-pool`` — Atelier's vLLM pool: bank adapters exported as rank-16 LoRAs, served by vLLM;
* ``vllm-bank`` — Atelier's vLLM pool with the plugin's bank layers (serve_app/vllm_plugin): each
  cluster's bases once per module, a Σ_i-only LoRA per adapter;
* ``vllm-lora`` — plain vLLM multi-LoRA serving the uncompressed PEFT adapters;
* ``peft`` — the naive server: peft, one adapter active at a time (``set_adapter`` per group);
* ``torch-static-bank`` — the torch engine as it was: static waves and the bank's per-cluster loop
  (the baseline of the continuous-batching scenarios).

Driving method (the same for all): in-process. Each (scenario, contender, N) runs in its own
subprocess (clean peak RSS, no shared threads or caches); C async clients send the requests
through ``engine.generate(request, [AdapterModifier(name)])`` and time each one (TTFT = first
streamed event, end-to-end = final event). Output lengths are fixed (``ignore_eos``), prompts are
distinct random words (nothing for a prefix cache to reuse), adapters are drawn uniformly from N.
Adapter loading happens before the clock starts for everyone (bank attach; peft load_adapter;
vLLM ``add_lora`` into its CPU cache) and is reported apart.

vLLM contenders with adapters also report ``adapter_memory`` (bytes, from the workers): bank bases
and Σ slots (``vllm-bank``), dense LoRA slots, and vLLM's host-memory LoRA cache holding all N.
Peak RSS is the worker's process tree (vLLM runs its engine core in a child process), sampled
every 0.2 s. Scenarios: ``sweep`` (throughput, TTFT, e2e p50/p99, peak RSS vs N), ``join`` (a 4-token request
sent 0.3 s after a 128-token one vs alone), ``mixed`` (C=16 mixed prompt and output lengths,
continuous vs static waves), ``dtype`` (the torch pool in float32 vs bfloat16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "atelier" / "bench-serving"


# ---------------------------------------------------------------------------- driver (worker side)
async def drive(engine, load, concurrency: int, tenant_of=None) -> list[dict]:
    """Send ``load`` (a serving_setup.Workload) through ``engine`` with ``concurrency`` clients."""
    from serve_app.replica.modifiers import AdapterModifier
    from serve_app.wire import GenerationRequest

    todo = list(range(len(load.prompts)))
    out: list[dict] = []

    async def client() -> None:
        while todo:
            i = todo.pop(0)
            adapter = load.adapters[i]
            req = GenerationRequest(request_id=f"b{i}-{time.perf_counter_ns()}", prompt=load.prompts[i],
                                    max_tokens=load.max_tokens[i], temperature=0, ignore_eos=True,
                                    adapter=adapter, tenant=tenant_of(i) if tenant_of else f"t{i % 7}")
            start, first, last = time.perf_counter(), None, None
            async for event in engine.generate(req, [AdapterModifier(adapter)] if adapter else []):
                if event.error is not None:
                    raise RuntimeError(f"request {i} failed: {event.error.message}")
                if first is None and (event.text or event.final):
                    first = time.perf_counter()
                last = event
            end = time.perf_counter()
            out.append({"i": i, "start": start, "ttft": first - start, "e2e": end - start, "end": end,
                        "tokens": last.completion_tokens, "prompt_tokens": last.prompt_tokens})

    await asyncio.gather(*[client() for _ in range(concurrency)])
    return out


def summary(rows: list[dict]) -> dict:
    from bench.common import percentile

    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    ms = lambda key, q: round(1000 * percentile([r[key] for r in rows], q), 1)  # noqa: E731
    return {"requests": len(rows), "output_tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "ttft_p50_ms": ms("ttft", 50), "ttft_p99_ms": ms("ttft", 99),
            "e2e_p50_ms": ms("e2e", 50), "e2e_p99_ms": ms("e2e", 99),
            "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in rows), 1)}


async def join_scenario(engine, reps: int) -> dict:
    """The issue's probe: a 4-token request alone, then sent 0.3 s after a 128-token request."""
    from bench.serving_setup import workload

    long = workload(1, 64, 128, None, seed=11)
    short = workload(1, 64, 4, None, seed=12)
    alone, joined = [], []
    for _ in range(reps):
        alone.append((await drive(engine, short, 1))[0]["e2e"])
    for _ in range(reps):
        task = asyncio.create_task(drive(engine, long, 1))
        await asyncio.sleep(0.3)
        joined.append((await drive(engine, short, 1))[0]["e2e"])
        await task
    a, j = statistics.median(alone), statistics.median(joined)
    return {"short_alone_ms": round(1000 * a, 1), "short_joined_ms": round(1000 * j, 1),
            "ratio": round(j / a, 2), "alone_all_ms": [round(1000 * x, 1) for x in alone],
            "joined_all_ms": [round(1000 * x, 1) for x in joined]}


class TreeRSS:
    """Peak resident memory of this process plus its children (vLLM's engine core runs in a child),
    sampled every ``interval_s`` on a daemon thread."""

    def __init__(self, interval_s: float = 0.2):
        import threading

        import psutil

        self.peak = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(interval_s,), daemon=True).start()

    def sample(self) -> int:
        total = self._me.memory_info().rss
        for child in self._me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # the child exited meanwhile
                pass
        self.peak = max(self.peak, total)
        return total

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def stop(self) -> int:
        self.sample()
        self._stop.set()
        return self.peak


def engine_device(engine, contender: str) -> str:
    """Where the contender's forward ran (the report says which device each number came from):
    vLLM's platform for vLLM contenders, else the device of the model's parameters."""
    if contender.startswith("vllm"):
        from vllm.platforms import current_platform

        return str(current_platform.device_type or "unknown")
    try:
        return next(engine.model.parameters()).device.type
    except (AttributeError, StopIteration, TypeError):
        return "unknown"


def worker(spec: dict) -> dict:
    """One (scenario, contender, N, dtype) measurement in this process."""
    rss = TreeRSS()
    from bench.serving_setup import adapter_dirs, build, warm, workload
    from cluster.models import resolve_model
    from cluster.settings import load_settings

    if spec.get("legacy_bank") or spec["contender"] == "torch-static-bank":
        import compression.batched  # the bank op as it was: the per-module cluster loop (bank_delta)

        compression.batched.STACK_MAX_CLUSTERS = 0
    model = resolve_model(spec["model"], load_settings())
    root = Path(spec["cache"]) / model.id
    n, contender = spec["n"], spec["contender"]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    names = [name for name, _ in adapter_dirs(root, model.path, n)] if n and not contender.endswith("base") else None
    warmup = workload(min(4, spec["concurrency"]), 16, 4, names, seed=99)
    if spec["scenario"] == "mixed":
        import random

        rng = random.Random(5)
        reqs = spec["requests"]
        load = workload(reqs, [rng.choice([16, 32, 64, 128, 256]) for _ in range(reqs)],
                        [rng.choice([8, 16, 32, 64, 128]) for _ in range(reqs)], names, seed=5)
    else:
        load = workload(spec["requests"], spec["prompt_tokens"], spec["max_tokens"], names, seed=1)
    used = {a for a in (*warmup.adapters, *load.adapters) if a} if names else None
    engine, adapters_s = build(contender, model, spec["dtype"], spec["threads"], spec["max_rows"], root, n, log,
                               spec.get("vllm_cpus"), used)
    load_before = os.getloadavg()[0]

    async def main() -> dict:
        warm_s = await warm(engine, contender)
        await drive(engine, warmup, spec["concurrency"])
        if spec["scenario"] == "join":
            return {"join": await join_scenario(engine, spec["reps"]), "warm_s": warm_s}
        rows = await drive(engine, load, spec["concurrency"])
        out = {**summary(rows), "warm_s": warm_s}
        if contender.startswith("vllm") and n:  # what the workers hold for the N resident adapters
            out["adapter_memory"] = await engine.adapter_memory()
        return out

    result = asyncio.run(main())
    device = engine_device(engine, contender)
    stats = engine.stats().model_dump()
    peak = rss.stop()
    engine.shutdown()
    return {**spec, **result, "adapters_load_s": round(adapters_s + result.pop("warm_s"), 2),
            "peak_rss_mb": round(peak / 2**20),
            "peak_rss_self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "engine_stats": stats, "threads": spec["threads"], "device": device}


# ---------------------------------------------------------------------------- orchestrator
def run_worker(spec: dict, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "bench.serving", "--worker", json.dumps(spec), "--worker-out", f.name]
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            print(f"[bench.serving] {spec['scenario']} {spec['contender']} N={spec['n']} timed out", flush=True)
            return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-15:])
            print(f"[bench.serving] {spec['scenario']} {spec['contender']} N={spec['n']} FAILED:\n{tail}", flush=True)
            return {**spec, "error": tail}
        result = json.loads(Path(f.name).read_text())
    result["process_s"] = round(time.perf_counter() - started, 1)
    print(f"[bench.serving] {spec['scenario']:5s} {spec['contender']:18s} N={spec['n']:<4d} {spec['dtype']:8s} "
          + (f"join x{result['join']['ratio']}" if "join" in result else
             f"{result['tok_s']} tok/s, e2e p50 {result['e2e_p50_ms']} ms, RSS {result['peak_rss_mb']} MB")
          + f" (load {result['loadavg_before']})", flush=True)
    return result


def plan(args) -> list[dict]:
    base = {"model": args.model, "cache": str(args.cache), "threads": args.threads, "max_rows": args.max_rows,
            "concurrency": args.concurrency, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens, "dtype": args.dtype, "reps": args.reps, "vllm_cpus": args.vllm_cpus}
    specs = []
    scen = args.scenarios
    if "sweep" in scen:  # ordered by N (bases first, the reference manager last): a stopped run keeps small Ns
        sweep = {**base, "scenario": "sweep"}
        specs += [{**sweep, "contender": c, "n": 0} for c in args.contenders if c.endswith("base") and c != "hf-cb-base"]
        specs += [{**sweep, "contender": c, "n": n} for n in args.ns for c in args.contenders if not c.endswith("base")]
        specs += [{**sweep, "contender": c, "n": 0} for c in args.contenders if c == "hf-cb-base"]
    if "join" in scen:
        for c in ("torch-base", "torch-static-bank"):
            specs.append({**base, "scenario": "join", "contender": c, "n": 0, "max_rows": 8})
    if "mixed" in scen:
        mixed = {**base, "scenario": "mixed", "concurrency": 16, "requests": args.mixed_requests, "n": args.mixed_n}
        specs.append({**mixed, "contender": "torch-bank", "max_rows": 16})
        for rows in (8, 16):  # today's default wave size, and the same 16 rows
            specs.append({**mixed, "contender": "torch-static-bank", "max_rows": rows})
    if "dtype" in scen:
        for dtype in ("float32", "bfloat16"):
            specs.append({**base, "scenario": "dtype", "contender": "torch-bank", "n": args.mixed_n, "dtype": dtype})
    return specs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (catalog name or directory)")
    p.add_argument("--ns", default="1,10,100,1000", help="adapter counts N")
    p.add_argument("--contenders", default="torch-base,vllm-base,hf-cb-base,torch-bank,vllm-pool,vllm-lora,peft")
    p.add_argument("--scenarios", default="sweep,join,mixed,dtype")
    p.add_argument("--concurrency", type=int, default=8, help="C concurrent clients (sweep)")
    p.add_argument("--requests", type=int, default=32, help="measured requests per sweep point")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (words ~ tokens)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (fixed: ignore_eos)")
    p.add_argument("--max-rows", type=int, default=16, help="rows per running batch for every engine")
    p.add_argument("--mixed-requests", type=int, default=48)
    p.add_argument("--mixed-n", type=int, default=100, help="adapters in the mixed and dtype scenarios")
    p.add_argument("--reps", type=int, default=3, help="repetitions of the join probe (median)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="every contender's dtype (the dtype scenario measures both for the torch pool)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("ATELIER_THREADS", "2")))
    p.add_argument("--vllm-cpus", help="cores vLLM binds its threads to (VLLM_CPU_OMP_THREADS_BIND, e.g. '1' "
                   "when another run holds core 0); default the first --threads cores")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic adapters and banks (reused)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    p.add_argument("--name", default="serving", help="result file name")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--smoke", action="store_true", help="CI: tiny-random, N=2, no vLLM, a few requests")
    p.add_argument("--combine", help="comma-separated result JSONs of earlier runs (e.g. the sweep and the "
                   "continuous-batching scenarios run apart): one report of all their results, nothing re-run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    if args.smoke:
        args.model, args.ns, args.requests, args.max_tokens, args.prompt_tokens = "tiny-random", "2", 4, 4, 8
        args.contenders, args.reps, args.scenarios = "torch-base,torch-bank,peft,torch-static-bank", 1, "sweep,join"
        args.dtype, args.cache = "float32", args.out / "cache"
    args.ns = [int(x) for x in str(args.ns).split(",")]
    args.contenders = args.contenders.split(",")
    args.scenarios = args.scenarios.split(",")
    from bench.serving_report import report

    started = time.perf_counter()
    if args.combine:
        payloads = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
        results = [{**r, "run": Path(f).stem} for f, payload in zip(args.combine.split(","), payloads, strict=True)
                   for r in payload["results"]]
        sources = [f"`{payload['command']}` ({payload['machine']['time']}, {payload.get('seconds', 0) / 60:.1f} min)"
                   for payload in payloads]
        report(results, args, argv, sum(payload.get("seconds", 0) for payload in payloads), sources)
        return
    results = []
    for spec in plan(args):  # the report is rewritten after every worker: a stopped run keeps what it measured
        results.append(run_worker(spec, args.timeout))
        report(results, args, argv, time.perf_counter() - started)


if __name__ == "__main__":
    main()
