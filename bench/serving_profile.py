"""Profile the torch pool under bench load with py-spy: where the time goes, before and after.

    python -m bench.serving_profile            # -> docs/bench/serving_profile.{json,md}

Runs the ``torch-bank`` contender of ``bench/serving.py`` (same workload: C clients, N adapters,
fixed lengths) under ``py-spy record`` for each variant, in one run:

* ``before`` — the bank's per-module cluster loop (``compression.batched.bank_delta``);
* ``after``  — the stacked delta planned once per forward (``stacked_delta``, the default).

For each it reports throughput and the functions holding the most samples of the engine thread
(self time, and inclusive time of the serving hot spots). py-spy samples the whole process; idle
threads are skipped (py-spy's default).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOT = ("BankLinear.forward", "bank_delta", "stacked_delta", "RowPlan.build", "grouped_sdpa", "SlotCache.update",
       "TorchEngine._decode", "TorchEngine._prefill", "TorchEngine._advance", "Detokenizer.push", "TorchEngine._sample",
       "attention_mask")


def parse_raw(path: Path) -> tuple[collections.Counter, collections.Counter, int]:
    """py-spy ``--format raw`` (collapsed stacks ``a;b;c count``) -> (self counts, inclusive counts, total)."""
    self_counts: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.split(" (")[0] for f in stack.split(";")]
        total += n
        self_counts[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    return self_counts, incl, total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="adapters N")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = p.parse_args(argv)
    from bench.common import command_line, write_results
    from bench.serving import DEFAULT_CACHE

    base = {"model": args.model, "cache": str(DEFAULT_CACHE), "threads": args.threads, "max_rows": 16,
            "concurrency": args.concurrency, "requests": args.requests, "prompt_tokens": 64,
            "max_tokens": args.max_tokens, "dtype": args.dtype, "reps": 1, "scenario": "sweep",
            "contender": "torch-bank", "n": args.n}
    table, profiles = [], {}
    for variant, legacy in (("before (cluster loop)", True), ("after (stacked, planned once)", False)):
        spec = {**base, "legacy_bank": legacy}
        with tempfile.TemporaryDirectory() as tmp:
            raw, out = Path(tmp) / "stacks.txt", Path(tmp) / "result.json"
            cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "--rate", str(args.rate), "--output", str(raw), "--",
                   sys.executable, "-m", "bench.serving", "--worker", json.dumps(spec), "--worker-out", str(out)]
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{variant}: {proc.stderr[-2000:]}")
            result = json.loads(out.read_text())
            self_counts, incl, total = parse_raw(raw)
        def share(count: int, total: int = total) -> float:
            return round(100 * count / max(total, 1), 1)

        profiles[variant] = {"self": self_counts.most_common(25), "inclusive": incl.most_common(60), "total": total}
        hot = {name: share(incl.get(name, 0)) for name in HOT if incl.get(name)}
        table.append({"variant": variant, "tok/s": result["tok_s"], "e2e p50 ms": result["e2e_p50_ms"],
                      "samples": total, **{f"% {k}": v for k, v in hot.items()},
                      "top self": "; ".join(f"{n} {share(c)}%" for n, c in self_counts.most_common(6)),
                      "load avg": result["loadavg_before"], "wall s": round(time.perf_counter() - started, 1)})
        print(table[-1], flush=True)
    notes = (f"torch-bank, N={args.n} synthetic adapters, C={args.concurrency}, {args.requests} requests x "
             f"{args.max_tokens} tokens, {args.dtype}, {args.threads} threads. Percentages: share of all py-spy "
             "samples (non-idle threads) whose stack contains the function (inclusive) or ends in it (self).")
    write_results(args.out, "serving_profile", {"rows": table, "profiles": profiles}, table,
                  "Torch pool profile under bench load: before / after", command_line("bench.serving_profile", argv),
                  notes)


if __name__ == "__main__":
    main()
