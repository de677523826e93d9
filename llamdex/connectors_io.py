"""Wire format of trained connectors: ``connectors.safetensors`` + ``connectors.json`` (:class:`ConnectorsSpec`).

The spec pins the base model (id + content hash: hidden states of another model mean nothing to
the encoder), the insertion point (layer k, n slots), the expert layout it was trained for
(feature order, input columns, classes), the answer tokens and system prompt (serving must
rebuild the training prompt byte for byte), the encoder/decoder hyper-parameters and the
training report. Weights are written first and the JSON last (it records the weights' SHA-256),
each atomically, so a reader never pairs a manifest with half-written or foreign weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from llamdex._validation import format_errors, parse_json_strict, rules_error
from llamdex.codec import FeatureCodec
from llamdex.connectors import Decoder, DecoderConfig
from llamdex.encoder import Encoder, EncoderConfig
from llamdex.expert import _atomic_write
from llamdex.schema import TenantSchema

FORMAT = "llamdex.connectors"
FORMAT_VERSION = 2
"""2: the encoder reads the schema's vocabulary and six literal kinds, every feature may be "not stated"
(issue 16). Version-1 connectors are refused with a clear error: retrain them."""
CONNECTORS_JSON = "connectors.json"
CONNECTORS_WEIGHTS = "connectors.safetensors"


class ConnectorsError(ValueError):
    """Connectors were rejected; ``problems`` holds one 'where: what; fix: how' line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid connectors:\n  " + "\n  ".join(self.problems))


class TrainingReport(BaseModel):
    """How the connectors were trained and how good they are (free-form numbers, for humans/dashboards)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict)
    stage1_losses: list[float] = Field(default_factory=list)
    stage2_losses: list[float] = Field(default_factory=list)
    fidelity: dict[str, dict[str, float]] = Field(default_factory=dict)  # held-out phrasings, per feature
    stage2: dict[str, float] = Field(default_factory=dict)  # accuracies vs synthetic labels
    seconds: dict[str, float] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class ConnectorsSpec(BaseModel):
    """``connectors.json``: see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["llamdex.connectors"] = FORMAT
    format_version: Literal[2] = FORMAT_VERSION
    base_model_id: str
    base_model_hash: str = Field(min_length=8)
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    layer: int = Field(ge=0)
    num_slots: int = Field(ge=1, le=64)
    tenant_schema: dict[str, Any]
    schema_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    feature_order: list[str] = Field(min_length=1)
    input_columns: list[str] = Field(min_length=1)
    input_size: int = Field(ge=1)
    output_size: int = Field(ge=1)
    class_names: list[str] = Field(min_length=2)
    class_token_ids: list[int]
    class_token_strings: list[str]
    system_prompt: str
    encoder: EncoderConfig
    decoder: DecoderConfig
    training: TrainingReport | None = None
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _consistent(self) -> ConnectorsSpec:
        checks = [
            ("layer", self.layer < self.num_layers, f"must be < num_layers {self.num_layers}"),
            ("input_columns", len(self.input_columns) == self.input_size, f"needs {self.input_size} names"),
            ("encoder.features", sum(f.width for f in self.encoder.features) == self.input_size,
             f"widths must add up to input_size {self.input_size}"),
            ("encoder.hidden_size", self.encoder.hidden_size == self.hidden_size, f"must be {self.hidden_size}"),
            ("decoder.hidden_size", self.decoder.hidden_size == self.hidden_size, f"must be {self.hidden_size}"),
            ("decoder.input_size", self.decoder.input_size == self.output_size, f"must be {self.output_size}"),
            ("decoder.num_slots", self.decoder.num_slots == self.num_slots, f"must be {self.num_slots}"),
            ("class_token_ids", len(self.class_token_ids) == len(self.class_names) == len(self.class_token_strings),
             "needs one token id and one string per class"),
        ]
        problems = [(k, f"{msg}; fix: rebuild the spec with build_spec") for k, ok, msg in checks if not ok]
        if problems:
            raise rules_error(problems)
        return self

    def codec(self) -> FeatureCodec:
        """The feature codec of the schema the connectors were trained on."""
        return FeatureCodec(self.tenant_schema)


def build_spec(*, model_id: str, model_hash: str, num_layers: int, schema: TenantSchema, layer: int,
               encoder: EncoderConfig, decoder: DecoderConfig, class_token_ids: list[int],
               class_token_strings: list[str], system_prompt: str, training: TrainingReport | None = None
               ) -> ConnectorsSpec:
    """A spec whose layout fields are derived from ``schema`` (so they cannot disagree with the codec)."""
    codec = FeatureCodec(schema)
    return ConnectorsSpec(
        base_model_id=model_id, base_model_hash=model_hash, num_layers=num_layers, hidden_size=decoder.hidden_size,
        layer=layer, num_slots=decoder.num_slots, tenant_schema=schema.model_dump(mode="json"),
        schema_sha256=schema.sha256(), feature_order=codec.feature_names, input_columns=codec.columns,
        input_size=codec.m, output_size=codec.output_size, class_names=codec.class_names,
        class_token_ids=class_token_ids, class_token_strings=class_token_strings, system_prompt=system_prompt,
        encoder=encoder, decoder=decoder, training=training)


def _tensors(encoder: Encoder, decoder: Decoder) -> dict[str, torch.Tensor]:
    named = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    named |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in named.items()}


def _check_tensors(tensors: dict[str, torch.Tensor], spec: ConnectorsSpec, where: str) -> list[str]:
    expected = {k: tuple(v.shape) for k, v in _tensors(Encoder(spec.encoder), Decoder(spec.decoder)).items()}
    problems = []
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            problems.append(f"{where}[{name}]: missing tensor (shape {list(shape)}); fix: save with save_connectors")
        elif tuple(t.shape) != shape:
            problems.append(f"{where}[{name}]: shape {list(t.shape)} but {CONNECTORS_JSON} implies {list(shape)}; "
                            "fix: the weights and the JSON come from different runs, save them together")
        elif not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            problems.append(f"{where}[{name}]: not finite floating-point values (NaN/inf); "
                            "fix: training diverged, retrain with a lower learning rate")
    problems += [f"{where}[{n}]: unexpected tensor; fix: remove it" for n in sorted(set(tensors) - set(expected))]
    return problems


def save_connectors(encoder: Encoder, decoder: Decoder, spec: ConnectorsSpec, directory: str | Path) -> ConnectorsSpec:
    """Write ``connectors.safetensors`` then ``connectors.json`` (atomic each); returns the spec written."""
    if encoder.cfg != spec.encoder or decoder.cfg != spec.decoder:
        raise ConnectorsError(["spec: encoder/decoder configs differ from the modules'; fix: build the spec "
                               "from encoder.cfg and decoder.cfg"])
    tensors = _tensors(encoder, decoder)
    problems = _check_tensors(tensors, spec, "modules")
    if problems:
        raise ConnectorsError(problems)
    data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    final = spec.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / CONNECTORS_WEIGHTS, data)
    _atomic_write(directory / CONNECTORS_JSON, (final.model_dump_json(indent=2) + "\n").encode("utf-8"))
    return final


def read_spec(directory: str | Path) -> ConnectorsSpec:
    """Parse and validate ``connectors.json`` (ConnectorsError naming every bad field)."""
    path = Path(directory) / CONNECTORS_JSON
    if not path.is_file():
        raise ConnectorsError([f"{CONNECTORS_JSON}: not found in {directory}; fix: pass the directory "
                               "save_connectors wrote"])
    try:
        data = parse_json_strict(path.read_text(encoding="utf-8"), CONNECTORS_JSON)
        if isinstance(data, dict) and data.get("format_version") == 1:
            raise ConnectorsError([f"{CONNECTORS_JSON}.format_version: 1 (trained before the encoder read the schema's "
                                   "vocabulary and unstated features); fix: retrain these connectors "
                                   "(train_jobs.connectors)"])
        return ConnectorsSpec.model_validate(data)
    except ValidationError as e:
        lines = format_errors(e, root="")  # 'field.path: problem; fix: ...' (': ...' for the whole spec)
        raise ConnectorsError([CONNECTORS_JSON + (ln if ln.startswith(":") else "." + ln) for ln in lines]) from None
    except ConnectorsError:
        raise
    except ValueError as e:
        raise ConnectorsError([str(e)]) from None


def load_connectors(directory: str | Path, expected_model_hash: str) -> tuple[Encoder, Decoder, ConnectorsSpec]:
    """Load and validate connectors built for the base model with content hash ``expected_model_hash``.

    Refuses: another base model; weights whose SHA-256 differs from the JSON; missing, extra,
    misshapen or non-finite tensors. Returns frozen modules in eval mode.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    if spec.base_model_hash != expected_model_hash:
        raise ConnectorsError([
            f"{CONNECTORS_JSON}.base_model_hash: built for {spec.base_model_id!r} (hash {spec.base_model_hash[:12]}…) "
            f"but the serving model has hash {expected_model_hash[:12]}…; fix: retrain the connectors against "
            "this base model, or serve them on a pool running the original model"])
    path = directory / CONNECTORS_WEIGHTS
    if not path.is_file():
        raise ConnectorsError([f"{CONNECTORS_WEIGHTS}: not found in {directory}; fix: save with save_connectors"])
    data = path.read_bytes()
    if spec.weights_sha256 is None:
        raise ConnectorsError([f"{CONNECTORS_JSON}.weights_sha256: missing; fix: save with save_connectors "
                               "(it records the weights' SHA-256)"])
    if hashlib.sha256(data).hexdigest() != spec.weights_sha256:
        raise ConnectorsError([f"{CONNECTORS_WEIGHTS}: SHA-256 differs from {CONNECTORS_JSON}.weights_sha256; "
                               "fix: the two files come from different saves, save again"])
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ConnectorsError([f"{CONNECTORS_WEIGHTS}: unreadable safetensors ({e}); fix: save again"]) from None
    problems = _check_tensors(tensors, spec, CONNECTORS_WEIGHTS)
    if problems:
        raise ConnectorsError(problems)
    encoder, decoder = Encoder(spec.encoder), Decoder(spec.decoder)
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}, strict=True)
    decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")}, strict=True)
    for module in (encoder, decoder):
        module.eval().requires_grad_(False)
    return encoder, decoder, spec
