"""Artifact kinds, the files each may contain, and the checks run before anything is stored.

Tenant artifacts are data, never code: every kind is a fixed set of JSON and safetensors
files. Anything else (``.bin``, ``.pt``, ``.pkl``, extra files) is refused by name, so no
tenant file is ever unpickled. Kind-specific deep validation (schema rules, expert shapes,
adapter shapes, bank consistency) lives in the science packages and is called from here.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes


class ArtifactKind(str, enum.Enum):
    """What an artifact is. Values are the directory names used in the store."""

    schema = "schema"
    expert = "expert"
    connectors = "connectors"
    adapter = "adapter"
    bank = "bank"


REQUIRED_FILES: dict[ArtifactKind, tuple[str, ...]] = {
    ArtifactKind.schema: ("schema.json",),
    ArtifactKind.expert: ("expert.json", "expert.safetensors"),
    ArtifactKind.connectors: ("connectors.json", "connectors.safetensors"),
    ArtifactKind.adapter: ("adapter_config.json", "adapter_model.safetensors"),
    ArtifactKind.bank: ("bank.json", "bank.safetensors"),
}
OPTIONAL_FILES: dict[ArtifactKind, tuple[str, ...]] = {
    ArtifactKind.adapter: ("README.md",),
    ArtifactKind.connectors: ("report.json",),
    ArtifactKind.bank: ("report.json",),
}

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_HEADER_BYTES: dict[ArtifactKind, int] = {kind: 1 << 20 for kind in ArtifactKind} | {ArtifactKind.bank: 64 << 20}
"""Largest safetensors header (names, dtypes, shapes, offsets) per kind. A LoRA for a 70B model
needs ~150 kB; a bigger header is padding meant to make the parser allocate, and is refused."""


class ArtifactError(ValueError):
    """An artifact was refused. The message names the file or field and how to fix it."""


DeepValidator = Callable[[Mapping[str, bytes]], None]
_DEEP_VALIDATORS: dict[ArtifactKind, DeepValidator] = {}


def register_validator(kind: ArtifactKind, validator: DeepValidator) -> None:
    """Install the science package's validator for ``kind`` (``cluster.validators.install_validators`` does)."""
    _DEEP_VALIDATORS[kind] = validator


def parse_kind(value: str) -> ArtifactKind:
    """The kind named by ``value``, or an error listing the valid kinds."""
    try:
        return ArtifactKind(value)
    except ValueError:
        valid = ", ".join(k.value for k in ArtifactKind)
        raise ArtifactError(f"kind: unknown artifact kind {value!r}; fix: use one of {valid}") from None


def check_name(name: str, field: str = "name") -> str:
    """Artifact names are lowercase identifiers: they appear in URLs and model ids."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ArtifactError(f"{field}: {name!r} is not a valid name; fix: match {NAME_PATTERN.pattern}")
    return name


def validate_files(kind: ArtifactKind, files: Mapping[str, bytes]) -> None:
    """Refuse unknown or missing files, unparsable JSON and unsafe/invalid tensors, then deep-check."""
    allowed = set(REQUIRED_FILES[kind]) | set(OPTIONAL_FILES.get(kind, ()))
    unexpected = sorted(set(files) - allowed)
    if unexpected:
        raise ArtifactError(
            f"files: {', '.join(unexpected)} not allowed in a {kind.value} artifact; "
            f"fix: send only {', '.join(sorted(allowed))} (JSON and safetensors only; pickled "
            "formats such as .bin/.pt are never accepted)")
    missing = [f for f in REQUIRED_FILES[kind] if f not in files]
    if missing:
        raise ArtifactError(f"files: {kind.value} artifact is missing {', '.join(missing)}; fix: include it")
    for fname, data in files.items():
        if fname.endswith(".json"):
            parse_json_object(fname, data)
        elif fname.endswith(".safetensors"):
            check_tensors(fname, data, MAX_HEADER_BYTES[kind])
    deep = _DEEP_VALIDATORS.get(kind)
    if deep is not None:
        deep(files)


def parse_json_object(fname: str, data: bytes) -> dict:
    """Decode a JSON object or raise naming the file and the position of the problem."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{fname}: not valid UTF-8 JSON ({exc}); fix: send a JSON object") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{fname}: top level must be a JSON object, got {type(value).__name__}")
    return value


def check_tensors(fname: str, data: bytes, max_header_bytes: int = 1 << 20) -> dict[str, torch.Tensor]:
    """Parse a safetensors file (no code execution possible); float tensors must be finite."""
    header = int.from_bytes(bytes(data[:8]), "little") if len(data) >= 8 else 0
    if header > max_header_bytes:
        raise ArtifactError(f"{fname}: safetensors header of {header} bytes, more than the {max_header_bytes} "
                            "allowed (or not a safetensors file); fix: save with safetensors.torch.save_file")
    try:
        tensors = load_safetensors_bytes(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ArtifactError(f"{fname}: not a valid safetensors file ({exc}); "
                            "fix: save with safetensors.torch.save_file") from None
    if not tensors:
        raise ArtifactError(f"{fname}: contains no tensors")
    for key, t in tensors.items():
        if t.is_complex() or t.dtype == torch.bool:
            raise ArtifactError(f"{fname}: tensor {key!r} has dtype {t.dtype}; fix: store float tensors")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{fname}: tensor {key!r} contains NaN or Inf; fix: retrain or re-export")
    return tensors
