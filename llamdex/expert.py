"""The tenant's expert: a small MLP over the schema's encoded features, plus its wire format.

Architecture (paper §3): Linear(m, 400) -> LayerNorm -> ReLU -> Linear(400, 200) -> LayerNorm
-> ReLU -> Linear(200, c), then an output activation. c = 1 for binary tasks (the output is
P(class 1)), c = K otherwise. LayerNorm (not BatchNorm) keeps it per-sample, i.e. Opacus-safe.

Deliberate fix of a paper quirk: the paper trains multiclass experts with CrossEntropy applied
to *sigmoid* outputs. Here multiclass experts default to ``softmax``: training uses CE on the
logits, and the module outputs softmax probabilities (a proper distribution, which is also what
the decoder receives). ``sigmoid`` multiclass (one-vs-rest, trained with BCE) stays available.

On disk an expert is two files, data first and manifest last:
``expert.safetensors`` (tensors ``fc1.weight`` ... ``out.bias``) and ``expert.json``
(:class:`ExpertSpec`, which records the weights' SHA-256). Nothing else is ever read:
no pickle, no ``torch.load``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from llamdex._validation import format_errors, parse_json_strict
from llamdex.codec import FeatureCodec
from llamdex.expert_spec import (
    FORMAT,
    FORMAT_VERSION,
    DPLedger,
    ExpertArch,
    ExpertError,
    ExpertSpec,
    OutputActivation,
)
from llamdex.schema import TenantSchema, load_schema

__all__ = [
    "FORMAT", "FORMAT_VERSION", "DPLedger", "ExpertArch", "ExpertError", "ExpertSpec", "OutputActivation",
    "ExpertMLP", "build_expert", "predict_proba", "save_expert", "load_expert", "EXPERT_JSON", "EXPERT_WEIGHTS",
]

EXPERT_JSON = "expert.json"
EXPERT_WEIGHTS = "expert.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


class ExpertMLP(nn.Module):
    """The expert network. ``forward`` returns probabilities (what the decoder consumes);
    ``logits`` returns pre-activation scores (what training losses use)."""

    def __init__(self, arch: ExpertArch):
        super().__init__()
        self.arch = arch
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        prev = arch.input_size
        for i, h in enumerate(arch.hidden_sizes, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, h)
            layers[f"ln{i}"] = nn.LayerNorm(h)
            layers[f"act{i}"] = nn.ReLU()
            prev = h
        layers["out"] = nn.Linear(prev, arch.output_size)
        self.net = nn.Sequential(layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation outputs (N, c)."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output activation applied: sigmoid (N, c) or softmax (N, K)."""
        z = self.net(x)
        return torch.sigmoid(z) if self.arch.output_activation == "sigmoid" else torch.softmax(z, dim=-1)


def build_expert(spec_or_arch: ExpertSpec | ExpertArch) -> ExpertMLP:
    """A freshly initialised expert module for a spec or architecture."""
    arch = spec_or_arch.arch() if isinstance(spec_or_arch, ExpertSpec) else spec_or_arch
    return ExpertMLP(arch)


@torch.no_grad()
def predict_proba(model: ExpertMLP, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Class probabilities (N, K) for every class, rows summing to 1.

    Binary (c = 1): [1 - p, p]. Softmax: as is. Sigmoid with K outputs (paper-style one-vs-rest):
    normalised to sum to 1.
    """
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x,
                         dtype=torch.float32)
    if xt.ndim != 2 or xt.shape[1] != model.arch.input_size:
        raise ValueError(f"x: expected shape (N, {model.arch.input_size}), got {tuple(xt.shape)}; "
                         "fix: encode rows with FeatureCodec of the expert's schema")
    was_training = model.training
    model.eval()
    out = model(xt)
    model.train(was_training)
    if model.arch.output_size == 1:
        p = out[:, 0]
        probs = torch.stack([1 - p, p], dim=1)
    elif model.arch.output_activation == "softmax":
        probs = out
    else:
        probs = out / out.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return probs.cpu().numpy().astype(np.float64)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_tensors(tensors: dict[str, torch.Tensor], arch: ExpertArch, where: str) -> list[str]:
    """Every required tensor present, nothing extra, floating dtype, right shape, all finite."""
    problems = []
    expected = arch.tensor_shapes()
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"{where}[{name}]: missing tensor (shape {list(shape)}); "
                            "fix: save all layers of the expert (fc*, ln*, out)")
            continue
        t = tensors[name]
        if not t.is_floating_point():
            problems.append(f"{where}[{name}]: dtype {t.dtype} is not floating point; fix: store float32 weights")
        elif tuple(t.shape) != shape:
            problems.append(f"{where}[{name}]: shape {list(t.shape)} but the spec implies {list(shape)}; "
                            "fix: make expert.json sizes match the trained weights")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{where}[{name}]: contains NaN or infinite values; fix: retrain or re-export the "
                            "expert (training diverged)")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"{where}[{name}]: unexpected tensor; fix: remove it (expected only {sorted(expected)})")
    return problems


def save_expert(model: ExpertMLP, spec: ExpertSpec, directory: str | Path) -> ExpertSpec:
    """Write ``expert.safetensors`` then ``expert.json`` (each via temp file + os.replace).

    The weights go first and the manifest last, and the manifest records the weights' SHA-256,
    so a reader never pairs a manifest with half-written or foreign weights. Returns the spec
    as written (with ``weights_sha256`` filled in).
    """
    if model.arch != spec.arch():
        raise ExpertError([f"spec: architecture {spec.arch().model_dump()} does not match the model's "
                           f"{model.arch.model_dump()}; fix: build the spec from the model's arch"])
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.net.state_dict().items()}
    problems = _check_tensors(tensors, spec.arch(), "model")
    if problems:
        raise ExpertError(problems)
    data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    final = ExpertSpec.model_validate(spec.model_dump() | {"weights_sha256": hashlib.sha256(data).hexdigest()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / EXPERT_WEIGHTS, data)
    _atomic_write(directory / EXPERT_JSON, (final.model_dump_json(indent=2) + "\n").encode("utf-8"))
    return final


def _read_spec(directory: Path) -> ExpertSpec:
    path = directory / EXPERT_JSON
    if not path.is_file():
        raise ExpertError([f"{EXPERT_JSON}: not found in {directory}; fix: save the expert with save_expert "
                           "(it writes expert.json next to expert.safetensors)"])
    try:
        data = parse_json_strict(path.read_text(encoding="utf-8"), EXPERT_JSON)
    except (ValueError, UnicodeDecodeError) as e:
        raise ExpertError([str(e)]) from None
    if not isinstance(data, dict):
        raise ExpertError([f"{EXPERT_JSON}: must be a JSON object; fix: write the ExpertSpec fields"])
    try:
        return ExpertSpec.model_validate(data)
    except ValidationError as e:
        lines = format_errors(e, root="")  # 'field.path: problem; fix: ...' (': ...' for the whole spec)
        raise ExpertError([EXPERT_JSON + (line if line.startswith(":") else "." + line) for line in lines]) from None


def _read_weights(directory: Path, spec: ExpertSpec) -> dict[str, torch.Tensor]:
    path = directory / EXPERT_WEIGHTS
    if not path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        hint = (f" (found {pickles}: pickle/torch.save formats are refused because loading them can run code)"
                if pickles else "")
        raise ExpertError([f"{EXPERT_WEIGHTS}: not found in {directory}{hint}; fix: export the weights with "
                           "safetensors (save_expert does this)"])
    limit = 8 * sum(int(np.prod(s)) for s in spec.arch().tensor_shapes().values()) + (1 << 20)
    size = path.stat().st_size
    if size > limit:
        raise ExpertError([f"{EXPERT_WEIGHTS}: {size} bytes, far more than the {limit} the spec allows; "
                           "fix: save only the expert's tensors"])
    data = path.read_bytes()
    if spec.weights_sha256 is None:
        raise ExpertError([f"{EXPERT_JSON}.weights_sha256: missing; fix: set it to the SHA-256 of "
                           f"{EXPERT_WEIGHTS} (save_expert does this)"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.weights_sha256:
        raise ExpertError([f"{EXPERT_WEIGHTS}: SHA-256 {digest} does not match {EXPERT_JSON}.weights_sha256 "
                           f"{spec.weights_sha256}; fix: the two files come from different saves, save again"])
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ExpertError([f"{EXPERT_WEIGHTS}: not a readable safetensors file ({e}); "
                           "fix: re-export it with safetensors"]) from None


def _schema_problems(spec: ExpertSpec, schema: TenantSchema) -> list[str]:
    codec = FeatureCodec(schema)
    checks = [
        ("schema_name", spec.schema_name, schema.name),
        ("feature_order", spec.feature_order, codec.feature_names),
        ("input_columns", spec.input_columns, codec.columns),
        ("input_size", spec.input_size, codec.m),
        ("output_size", spec.output_size, codec.output_size),
        ("class_names", spec.class_names, codec.class_names),
    ]
    return [f"{EXPERT_JSON}.{key}: {got!r} does not match the schema's {want!r}; fix: load the expert with "
            "the schema it was trained on, or retrain it for this schema"
            for key, got, want in checks if got != want]


def load_expert(directory: str | Path, schema: TenantSchema | dict | str | None = None
                ) -> tuple[ExpertMLP, ExpertSpec]:
    """Load ``expert.json`` + ``expert.safetensors`` (nothing else is read; pickles are ignored).

    Checks: spec valid; weights hash matches the spec; every required tensor present with the
    spec's shape, floating dtype and finite values, no extra tensors; and, if ``schema`` is given,
    that the spec expects this schema's layout (feature order, input columns, m, c, classes;
    descriptions may differ). Returns ``(model, spec)``; the model is in eval mode and frozen.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExpertError([f"<directory>: {directory} is not a directory; fix: pass the folder holding "
                           f"{EXPERT_JSON} and {EXPERT_WEIGHTS}"])
    spec = _read_spec(directory)
    problems = _schema_problems(spec, load_schema(schema)) if schema is not None else []
    tensors = _read_weights(directory, spec)
    problems += _check_tensors(tensors, spec.arch(), EXPERT_WEIGHTS)
    if problems:
        raise ExpertError(problems)
    model = ExpertMLP(spec.arch())
    model.net.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    model.eval().requires_grad_(False)
    return model, spec
