"""The resumable directory of trained codebook adapters: one PEFT directory per task plus its record.

Layout (default ``<ATELIER_HOME>/lora-adapters/<model>/``, outside git)::

    codebook-0007/adapter_config.json        standard PEFT LoRA directory (safetensors only)
    codebook-0007/adapter_model.safetensors
    codebook-0007/task.json                   the task (facts, questions, description), metrics,
                                              base-model record and a config fingerprint
    index.json                                one row per adapter + summary

An adapter whose ``task.json`` fingerprint (task, training config, base-model content hash,
objective) matches is reused instead of retrained. The Ray Train job
(``train_jobs.lora_adapters``) fills the directory; the compression benchmarks read it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from compression.codebook.tasks import OBJECTIVE

TASK_FILE = "task.json"
INDEX_FILE = "index.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def default_out_dir(model_id: str, home: Path) -> Path:
    """Where the adapters of base model ``model_id`` live under the Atelier home directory."""
    return Path(home) / "lora-adapters" / model_id.replace(":", "-").replace("/", "-")


def fingerprint(task_dump: dict, cfg_dump: dict, model_hash: str) -> str:
    """What an adapter was trained from; a different fingerprint means retrain."""
    blob = json.dumps({"task": task_dump, "config": cfg_dump, "model": model_hash, "objective": OBJECTIVE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_task_json(adapter_dir: Path) -> dict | None:
    """The adapter's record, or None when the directory is incomplete."""
    try:
        rec = json.loads((adapter_dir / TASK_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not all((adapter_dir / f).is_file() for f in ADAPTER_FILES):
        return None
    return rec


def reusable_record(adapter_dir: Path, fp: str) -> dict | None:
    """The record of the adapter under ``adapter_dir`` if it was trained from fingerprint ``fp``
    (then there is nothing to train), else None."""
    record = read_task_json(adapter_dir)
    return record if record is not None and record.get("fingerprint") == fp else None


def train_and_write(model, tokenizer, task, cfg, adapter_dir: Path, base_model_record: dict, fp: str) -> dict:
    """Train ``task``'s adapter on ``model`` and write it as a PEFT directory with its ``task.json``
    record (metrics, base-model record, fingerprint ``fp``); returns the record."""
    from compression.codebook.train import train_lora, write_adapter_dir

    state, adapter_config, metrics = train_lora(model, tokenizer, task, cfg)
    record = {"task": task.model_dump(), "metrics": metrics, "base_model": base_model_record,
              "fingerprint": fp, "created_at": time.time(), "format": "peft-lora/safetensors"}
    write_adapter_dir(adapter_dir, state, adapter_config, extra={TASK_FILE: json.dumps(record, indent=2).encode()})
    return record


def build_index(out: Path, model_record: dict, run: dict) -> dict:
    """Index every adapter under ``out`` built against this base model (not only this run's)."""
    rows = []
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rec = read_task_json(d)
        if rec is None or rec.get("base_model", {}).get("content_hash") != model_record["content_hash"]:
            continue
        task, m = rec["task"], rec["metrics"]
        rows.append({
            "task_id": task["task_id"], "name": task["name"], "tenant": task["tenant"], "family": task["family"],
            "description": task["description"], "path": d.name,
            "base_accuracy": m["base_accuracy"], "accuracy": m["accuracy"],
            "base_heldout_accuracy": m["base_heldout_accuracy"], "heldout_accuracy": m["heldout_accuracy"],
            "base_test_accuracy": m.get("base_test_accuracy"), "test_accuracy": m.get("test_accuracy"),
            "base_choice_accuracy": m["base_choice_accuracy"], "choice_accuracy": m["choice_accuracy"],
            "first_token_accuracy": m.get("first_token_accuracy"),
            "chance": m["chance"], "steps": m["steps"], "train_seconds": m["seconds_total"],
            "train_cpu_seconds": m.get("cpu_seconds_total"), "trainable_params": m["trainable_params"],
            "fingerprint": rec["fingerprint"],
        })
    rows.sort(key=lambda r: r["task_id"])

    def stat(key: str) -> dict:
        vals = [r[key] for r in rows if r[key] is not None and not math.isnan(r[key])]
        if not vals:
            return {}
        return {"mean": round(sum(vals) / len(vals), 4), "min": min(vals), "max": max(vals)}

    families: dict[str, list[float]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r["accuracy"])
    summary = {"adapters": len(rows), **{k: stat(k) for k in (
        "accuracy", "heldout_accuracy", "test_accuracy", "base_accuracy", "base_heldout_accuracy",
        "base_test_accuracy", "base_choice_accuracy",
        "train_seconds", "train_cpu_seconds", "steps")},
        "accuracy_by_family": {f: round(sum(v) / len(v), 4) for f, v in sorted(families.items())},
        "at_least_90pct": sum(r["accuracy"] >= 0.9 for r in rows)}
    index = {"model": model_record, "created_at": time.time(), "run": run, "summary": summary,
             "metric": "exact match of the greedy reply (argmax over the full vocabulary: the single-token answer "
                       "word, then end of turn). accuracy: trained phrasings; heldout_accuracy: validation "
                       "paraphrases not trained on; test_accuracy: test paraphrases (final numbers only); "
                       "base_choice_accuracy: base model restricted to the answer vocabulary (chance 1/8)",
             "adapters": rows}
    tmp = out / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(out / INDEX_FILE)
    return index

