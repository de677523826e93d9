"""Results of ``bench/serving.py``: JSON, a Markdown table with the targets, a PNG (throughput vs N)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

LABELS = {"torch-base": "base model, torch engine", "vllm-base": "base model, vLLM",
          "hf-cb-base": "base model, transformers ContinuousBatchingManager",
          "torch-bank": "Atelier torch pool (bank)", "vllm-pool": "Atelier vLLM pool (bank exports)",
          "vllm-bank": "Atelier vLLM pool (bank layers, vLLM plugin)",
          "vllm-lora": "plain vLLM multi-LoRA (uncompressed)",
          "vllm-lora-all": "plain vLLM multi-LoRA (uncompressed, LoRA slots on all modules)",
          "peft": "peft, one adapter at a time",
          "torch-static-bank": "torch static waves (before)"}


def _ok(results: list[dict], scenario: str) -> list[dict]:
    return [r for r in results if r["scenario"] == scenario and "error" not in r]


def targets(results: list[dict]) -> dict:
    """The issue's targets: the sweep's at the largest N measured (None where a contender is missing),
    the join probe's and the mixed scenario's (each only if measured)."""
    sweep = _ok(results, "sweep")
    out = _sweep_targets(sweep) if sweep else {}
    joins = {r["contender"]: r["join"] for r in _ok(results, "join")}
    if "torch-base" in joins:
        out["join_ratio"] = joins["torch-base"]["ratio"]
        out["join_ok"] = joins["torch-base"]["ratio"] <= 1.5
    mixed = {(r["contender"], r["max_rows"]): r["tok_s"] for r in _ok(results, "mixed")}
    cb = mixed.get(("torch-bank", 16))
    static = [v for (c, _), v in mixed.items() if c == "torch-static-bank"]
    if cb and static:
        out["mixed_vs_static_best"] = round(cb / max(static), 2)
        out["mixed_vs_static_default"] = round(cb / mixed.get(("torch-static-bank", 8), max(static)), 2)
        out["mixed_ok"] = out["mixed_vs_static_default"] >= 1.5
    return out


def _sweep_targets(sweep: list[dict]) -> dict:
    """Targets at the largest N; a contender measured in several combined runs counts with the median
    of its runs' throughput (the runs' spread is in the table)."""
    top = max(r["n"] for r in sweep)
    runs = {r.get("run") for r in sweep if r["n"] == top}  # combined runs: the ceiling of the same run as top N

    def medians(keep) -> dict:
        by: dict[str, list[float]] = {}
        for r in sweep:
            if keep(r):
                by.setdefault(r["contender"], []).append(r["tok_s"])
        return {c: round(statistics.median(v), 1) for c, v in by.items()}

    at = medians(lambda r: r["n"] == 0 and r.get("run") in runs)
    if not any(c.endswith("base") for c in at):
        at = medians(lambda r: r["n"] == 0)
    at |= medians(lambda r: r["n"] == top)
    ceiling = max([at[c] for c in ("torch-base", "vllm-base", "hf-cb-base") if c in at] or [float("nan")])
    pools = {c: at[c] for c in ("torch-bank", "vllm-pool", "vllm-bank") if c in at}
    best = max(pools, key=pools.get) if pools else None
    out = {"n": top, "ceiling_tok_s": ceiling, "best_pool": best, "best_pool_tok_s": pools.get(best)}
    if best:
        out["vs_ceiling"] = round(pools[best] / ceiling, 2)
        out["vs_ceiling_ok"] = out["vs_ceiling"] >= 0.8
        plain = [at[c] for c in ("vllm-lora", "vllm-lora-all") if c in at]  # the better-configured plain vLLM
        for peer_tok_s, key, need in ((at.get("peft"), "vs_peft", 3.0), (max(plain, default=None), "vs_vllm_lora", 1.0)):
            if peer_tok_s:
                out[key] = round(pools[best] / peer_tok_s, 2)
                out[f"{key}_ok"] = out[key] >= need if key == "vs_peft" else out[key] > need
    return out


def rows(results: list[dict], scenario: str) -> list[dict]:
    """One table row per result of ``scenario``."""
    table = []
    for r in results:
        if r["scenario"] != scenario:
            continue
        row = {"contender": LABELS.get(r["contender"], r["contender"]), "N": r["n"], "dtype": r["dtype"],
               "device": r.get("device", "cpu (not recorded)"), "C": r["concurrency"], "rows": r["max_rows"]}
        if "run" in r:  # a --combine report: which run measured it
            row = {"run": r["run"], **row}
        if "error" in r:
            row["result"] = "FAILED: " + r["error"].splitlines()[-1][:100]
        elif "join" in r:
            j = r["join"]
            row.update({"alone ms": j["short_alone_ms"], "joined ms": j["short_joined_ms"], "ratio": j["ratio"],
                        "load avg": r["loadavg_before"]})
        else:
            row.update({"tok/s": r["tok_s"], "TTFT p50 ms": r["ttft_p50_ms"], "TTFT p99 ms": r["ttft_p99_ms"],
                        "e2e p50 ms": r["e2e_p50_ms"], "e2e p99 ms": r["e2e_p99_ms"],
                        "peak RSS MB": r["peak_rss_mb"], "adapter load s": r["adapters_load_s"],
                        "load avg": r["loadavg_before"]})
            mem = r.get("adapter_memory")
            if mem:  # vLLM workers: device-side adapter state (slots + bank bases) and host LoRA cache
                row.update({"adapter slots+bases MB": round((mem["lora_slots"] + mem["bank_bases"] + mem["bank_slots"])
                                                            / 2**20, 1),
                            "LoRA host cache MB": round(mem["lora_host_cache"] / 2**20, 1)})
        table.append(row)
    return table


def md_table(table: list[dict]) -> str:
    if not table:
        return "(not run)"
    cols = list(dict.fromkeys(c for row in table for c in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in table]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = _ok(results, "sweep")
    ns = sorted({r["n"] for r in sweep if r["n"]})
    if not ns:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for contender in LABELS:
        pts = sorted((r["n"], r["tok_s"]) for r in sweep if r["contender"] == contender)
        if not pts:
            continue
        if contender.endswith("base"):
            ax.axhline(statistics.median(t for _, t in pts), ls="--", lw=1, label=LABELS[contender], color="grey" if "torch" in contender
                       else "black")
        else:
            ax.plot([n for n, _ in pts], [t for _, t in pts], marker="o", label=LABELS[contender])
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N customizations (each request names a random one)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Serving throughput vs number of adapters (same machine, same run)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], args, argv, seconds: float, sources: list[str] | None = None) -> None:
    """Write JSON, Markdown and PNG of ``results`` (``sources``: the runs a ``--combine`` merged)."""
    from bench.common import command_line, write_results

    goals = targets(results)
    sections = [("Continuous batching: a short request joining a long one", "join"),
                ("Continuous batching: C=16, mixed prompt and output lengths", "mixed"),
                ("Torch pool dtype", "dtype")]
    threads = sorted({r["threads"] for r in results if "threads" in r}) or [args.threads]
    notes = [("Combined from: " + "; ".join(sources) + ". " if sources else "")
             + f"Total run time {seconds / 60:.1f} min"
             + ("" if sources else f"; load average at the end {os.getloadavg()[0]:.2f}")
             + " (each row: the load average when its worker started). Threads per contender: "
             f"{', '.join(map(str, threads))}.",
             "",
             "Driving: in-process, the same async client loop for every contender (see bench/serving.py); "
             "adapters are SYNTHETIC (4 planted clusters, rank 8, q_proj+v_proj on all layers); "
             "outputs have fixed length (ignore_eos); adapter loading is excluded from the timings; the peft "
             "server loads only the adapters its workload names (its load time grows with every adapter "
             "injected, its forward computes only the active one).",
             "", "Targets (largest N): " + ", ".join(f"{k}={v}" for k, v in goals.items())]
    for title, scenario in sections:
        notes += ["", f"## {title}", "", md_table(rows(results, scenario))]
    payload = {"results": results, "targets": goals, "seconds": round(seconds, 1), "sources": sources or [],
               "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                for k, v in vars(args).items()}}
    write_results(args.out, args.name, payload, rows(results, "sweep"),
                  "Serving at scale: every contender, " + ("runs made side by side" if sources and len(sources) > 1 else "one run"),
                  command_line("bench.serving", argv), "\n".join(notes))
    plot(results, args.out / f"{args.name}.png")
    print(f"[bench.serving] wrote {args.out / args.name}.md/.json/.png; targets: {goals}", flush=True)
