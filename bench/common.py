"""Shared helpers for benchmarks: percentiles, result files (JSON + Markdown table)."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize_ms(seconds: list[float]) -> dict:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p90_ms": round(percentile(ms, 90), 2),
            "p99_ms": round(percentile(ms, 99), 2), "mean_ms": round(statistics.fmean(ms), 2)}


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a results file records: ``python -m <module>`` + the arguments, shell-quoted so it
    can be pasted back (``argv`` None: this process's own)."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def write_results(out_dir: Path, name: str, payload: dict, table: list[dict], title: str, command: str,
                  notes: str = "") -> tuple[Path, Path]:
    """Write ``<name>.json`` (everything) and ``<name>.md`` (title, command, table, notes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"machine": machine(), "command": command, **payload}, indent=2))
    cols = list(table[0]) if table else []
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()['platform']}, "
             f"torch {torch.__version__}, measured {machine()['time']}", ""]
    if cols:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in table]
    if notes:
        lines += ["", notes]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
