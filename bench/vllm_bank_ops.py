"""Per-module adapter arithmetic on CPU: the vLLM plugin's bank layers vs vLLM's own LoRA ops.

    python -m bench.vllm_bank_ops --out docs/bench          # -> vllm_bank_ops.{json,md}

One packed ``qkv_proj`` module of SmolLM2-135M (q 576→576, k and v 576→192), rank 16, ``--slots``
LoRA slots in ``--clusters`` clusters, T tokens of which every other one has no adapter (−1):

* ``bank`` — what the bank layers run (:func:`serve_app.vllm_plugin.bank_math.add_grouped_delta`):
  tokens grouped by cluster basis once, ``x V_c`` and ``· U_cᵀ`` as one GEMM per cluster, Σ per token;
* ``vllm`` — what vLLM 0.32 runs for dense LoRA slots on CPU (``bgmv_shrink`` + ``bgmv_expand_slice``
  from ``vllm/lora/ops/torch_ops``: each token's full A and B are gathered, then an einsum).

Same process, same inputs, one thread, alternating contenders; medians of ``--reps`` calls. This is
the LoRA part of one module only (not a served throughput: see bench/serving.py's ``vllm-bank``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

OUTS = (576, 192, 192)
D_IN = 576


def case(tokens: int, rank: int, slots: int, clusters: int, reps: int, seed: int = 0) -> dict:
    from vllm.lora.ops.torch_ops.lora_ops import bgmv_expand_slice, bgmv_shrink

    from serve_app.vllm_plugin.bank_math import SlotTable, add_grouped_delta

    g = torch.Generator().manual_seed(seed)
    U = [torch.randn(clusters, d, rank, generator=g) for d in OUTS]
    V = [torch.randn(clusters, D_IN, rank, generator=g) for _ in OUTS]
    sigma = [torch.randn(slots, rank, rank, generator=g) for _ in OUTS]
    A = [torch.randn(slots, rank, D_IN, generator=g) for _ in OUTS]
    B = [torch.randn(slots, d, rank, generator=g) for d in OUTS]
    x = torch.randn(tokens, D_IN, generator=g)
    idx = torch.tensor([i % slots if i % 2 else -1 for i in range(tokens)])
    table = SlotTable(slots, "cpu")
    for s in range(slots):
        table.assign(s, s % clusters)
    table.installed = set(range(clusters))
    out = torch.zeros(tokens, sum(OUTS))

    def bank() -> None:
        groups, off = table.plan(idx), 0
        for u, v, s, d in zip(U, V, sigma, OUTS, strict=True):
            add_grouped_delta(out[:, off:off + d], x, u, v, s, groups)
            off += d

    dense_idx = idx.clamp(min=0)  # vLLM reads −1 as a slot too; the cost is the same

    def vllm() -> None:
        off = 0
        for a, b, d in zip(A, B, OUTS, strict=True):
            buf = torch.zeros(tokens, rank)
            bgmv_shrink(x, a, buf, dense_idx, 1.0)
            bgmv_expand_slice(buf, b, out, dense_idx, off, d, True)
            off += d

    times: dict[str, list[float]] = {"bank": [], "vllm": []}
    for _ in range(reps):
        for name, fn in (("bank", bank), ("vllm", vllm)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    return {"tokens": tokens, "bank_us": round(med["bank"], 1), "vllm_us": round(med["vllm"], 1),
            "bank_over_vllm": round(med["bank"] / med["vllm"], 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4,16,128,512", help="tokens per step (decode rows … prefill)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--slots", type=int, default=5, help="LoRA slots (max_loras)")
    p.add_argument("--clusters", type=int, default=2)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    rows = [case(int(t), args.rank, args.slots, args.clusters, args.reps) for t in args.tokens.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "loadavg_before": round(load, 2),
               "loadavg_after": round(os.getloadavg()[0], 2), "torch": torch.__version__, "results": rows}
    (args.out / "vllm_bank_ops.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["# Bank layers vs vLLM's CPU LoRA ops, one qkv_proj module (SmolLM2 shapes)", "",
             f"rank {args.rank}, {args.slots} slots in {args.clusters} clusters, half the tokens without adapter, "
             f"1 thread, median of {args.reps}; load average {payload['loadavg_before']} → {payload['loadavg_after']}",
             "", "| tokens | bank layers µs | vLLM bgmv µs | bank / vLLM |", "|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['bank_us']} | {r['vllm_us']} | {r['bank_over_vllm']} |" for r in rows]
    (args.out / "vllm_bank_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
