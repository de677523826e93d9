"""Resume connector training after a kill: a finished stage 1 (the encoder) is kept on disk.

Stage 1 is most of a connectors run (:data:`llamdex.pipeline.BUDGET_SHARES`); the synthetic expert
and the hidden-state cache are cheaper to rebuild than to store (the cache of a real run is
gigabytes). So a run that dies after stage 1 resumes with the trained encoder and redoes only
the expert, the cache and stage 2. The checkpoint is plain data -- ``encoder.safetensors`` and
``stage.json`` -- never a pickle, and carries the fingerprint of the run that wrote it: a
checkpoint of another configuration is refused rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ENCODER_FILE = "encoder.safetensors"
META_FILE = "stage.json"


@dataclass
class EncoderCheckpoint:
    """A trained stage-1 encoder's weights and buffers, its loss curve and what it cost."""

    state: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # stage-1 wall time: what resuming from this checkpoint saves


def run_fingerprint(config: dict[str, Any], schema_json: str, model_hash: str) -> str:
    """Identity of a connectors run: same config, schema and base model -> same fingerprint."""
    blob = json.dumps({"config": config, "schema": json.loads(schema_json), "model": model_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_encoder_checkpoint(directory: str | Path, ckpt: EncoderCheckpoint, fingerprint: str) -> None:
    """Write ``ckpt`` into ``directory`` (created) as safetensors + JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.state.items()}, str(directory / ENCODER_FILE))
    meta = {"stage": "encoder", "fingerprint": fingerprint, "losses": ckpt.losses, "seconds": ckpt.seconds}
    (directory / META_FILE).write_text(json.dumps(meta))


def load_encoder_checkpoint(directory: str | Path, fingerprint: str) -> EncoderCheckpoint | None:
    """The stage-1 checkpoint in ``directory``, or None when it holds none.

    Raises ValueError when the checkpoint was written by a run with another fingerprint.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file() or not (directory / ENCODER_FILE).is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("stage") != "encoder":
        return None
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint: written by run {meta.get('fingerprint')!r}, this run is {fingerprint!r}; "
                         "fix: start fresh (another storage path or run) instead of resuming")
    return EncoderCheckpoint(state=load_file(str(directory / ENCODER_FILE)), losses=list(meta.get("losses", [])),
                             seconds=float(meta.get("seconds", 0.0)))


def config_record(config: Any) -> dict[str, Any]:
    """A dataclass config as the JSON-able dict :func:`run_fingerprint` hashes."""
    return json.loads(json.dumps(asdict(config), default=str))
