"""Wire format of an expert: ``expert.json`` = :class:`ExpertSpec` (architecture, expected input
layout, class names, weights hash) with its :class:`DPLedger` (what privacy the weights cost).

The spec is data a tenant may hand us, so it is validated strictly (unknown keys refused, sizes
bounded before anything is allocated) and every problem names its field and the fix.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llamdex._validation import rules_error
from llamdex.codec import FeatureCodec
from llamdex.schema import TenantSchema, load_schema

FORMAT = "llamdex.expert"
FORMAT_VERSION = 1
OutputActivation = Literal["sigmoid", "softmax"]
MAX_WIDTH = 65_536  # refuse absurd layer sizes from a hostile spec before allocating anything


class ExpertError(ValueError):
    """An expert artifact was rejected; ``problems`` holds one 'where: what; fix: how' line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid expert:\n  " + "\n  ".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NoiseRng = Literal["torchcsprng", "os.urandom", "fixed-seed"]
SECURE_NOISE_RNGS = ("torchcsprng", "os.urandom")


class DPLedger(_Strict):
    """What privacy the weights cost. ``epsilon`` is the epsilon actually spent (accountant's
    ``get_epsilon(delta)``); ``None`` means no DP at all (epsilon = infinity, mechanism 'none').

    ``secure_rng`` says whether an attacker could replay the DP-SGD noise and Poisson sampling:
    true only when both came from a source nobody recorded (``noise_rng``: 'torchcsprng' =
    Opacus secure_mode; 'os.urandom' = torch generators seeded from fresh os.urandom bytes per
    run, seeds never stored). 'fixed-seed' (the explicit reproducibility mode) is *not* secure:
    whoever knows the seed can subtract the noise, so the accountant's epsilon does not hold.
    ``noise_rng`` null = not stated (experts trained elsewhere). Without DP ``secure_rng`` is false.
    """

    mechanism: Literal["dp-sgd", "none"]
    epsilon: float | None
    target_epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    epochs: int = Field(ge=0)
    max_grad_norm: float | None = None
    accountant: Literal["rdp", "prv", "none"]
    secure_rng: bool = False
    noise_rng: NoiseRng | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_secure_mode(cls, data):
        """Ledgers written before ``secure_rng`` carry ``secure_mode`` (true = Opacus secure_mode)."""
        if isinstance(data, dict) and "secure_mode" in data and "secure_rng" not in data:
            data = dict(data)
            legacy = data.pop("secure_mode")
            if isinstance(legacy, bool):
                data["secure_rng"] = legacy and data.get("mechanism") == "dp-sgd"
                if legacy and data.get("mechanism") == "dp-sgd":
                    data.setdefault("noise_rng", "torchcsprng")
            else:
                data["secure_mode"] = legacy  # let 'extra forbidden' name it
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DPLedger:
        p: list[tuple[str, str]] = []
        if self.mechanism == "none":
            for key in ("epsilon", "target_epsilon", "delta", "max_grad_norm", "noise_rng"):
                if getattr(self, key) is not None:
                    p.append((key, "must be null when mechanism is 'none'; fix: set it to null or "
                                   "use mechanism 'dp-sgd'"))
            if self.secure_rng:
                p.append(("secure_rng", "must be false without DP (there is no noise); fix: set it to false"))
            if self.accountant != "none":
                p.append(("accountant", "must be 'none' when mechanism is 'none'; fix: set accountant 'none'"))
            if self.noise_multiplier != 0:
                p.append(("noise_multiplier", "must be 0 without DP; fix: set 0 or use mechanism 'dp-sgd'"))
        else:
            if self.epsilon is None or not (math.isfinite(self.epsilon) and self.epsilon > 0):
                p.append(("epsilon", f"DP-SGD needs a finite epsilon > 0 (got {self.epsilon}); "
                                     "fix: record the spent epsilon, or use mechanism 'none'"))
            if self.delta is None or not 0 < self.delta < 1:
                p.append(("delta", f"DP-SGD needs 0 < delta < 1 (got {self.delta}); fix: record the delta used"))
            if self.noise_multiplier <= 0:
                p.append(("noise_multiplier", "DP-SGD needs noise_multiplier > 0; fix: record the sigma used"))
            if self.max_grad_norm is None or self.max_grad_norm <= 0:
                p.append(("max_grad_norm", "DP-SGD needs a clipping norm > 0; fix: record the clip used"))
            if self.accountant == "none":
                p.append(("accountant", "DP-SGD needs 'rdp' or 'prv'; fix: name the accountant used"))
            if self.noise_rng is not None and self.secure_rng != (self.noise_rng in SECURE_NOISE_RNGS):
                p.append(("secure_rng", f"is {str(self.secure_rng).lower()} but noise_rng is "
                                        f"{self.noise_rng!r}; fix: secure_rng is true exactly for "
                                        f"{list(SECURE_NOISE_RNGS)}"))
        if p:
            raise rules_error(p)
        return self

    @property
    def is_dp(self) -> bool:
        """True when the weights come out of a DP mechanism (finite epsilon)."""
        return self.mechanism != "none"

    def public_view(self) -> dict:
        """The ledger as the API shows it: every field plus ``dp`` (whether the expert is DP)."""
        return {"dp": self.is_dp, **self.model_dump()}


class ExpertArch(_Strict):
    """Shape of the MLP: input size m, output size c, hidden widths and output activation."""

    input_size: int = Field(ge=1, le=MAX_WIDTH)
    output_size: int = Field(ge=1, le=MAX_WIDTH)
    hidden_sizes: list[int] = Field(default_factory=lambda: [400, 200], min_length=1, max_length=8)
    output_activation: OutputActivation = "sigmoid"

    @field_validator("hidden_sizes")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        bad = [(f"[{i}]", f"width must be in 1..{MAX_WIDTH} (got {h}); fix: use e.g. [400, 200]")
               for i, h in enumerate(v) if not 1 <= h <= MAX_WIDTH]
        if bad:
            raise rules_error(bad)
        return v

    @model_validator(mode="after")
    def _activation(self) -> ExpertArch:
        if self.output_size == 1 and self.output_activation != "sigmoid":
            raise rules_error([("output_activation", "a single output (binary task) must be 'sigmoid'; "
                                                     "fix: set output_activation 'sigmoid'")])
        return self

    @classmethod
    def from_schema(cls, schema: TenantSchema | dict | str, hidden_sizes: list[int] | tuple[int, ...] = (400, 200),
                    output_activation: OutputActivation | None = None) -> ExpertArch:
        """Architecture for a schema: m from the codec, c = 1 (binary) or K; softmax for K > 2."""
        codec = FeatureCodec(schema)
        act = output_activation or ("sigmoid" if codec.output_size == 1 else "softmax")
        return cls(input_size=codec.m, output_size=codec.output_size, hidden_sizes=list(hidden_sizes),
                   output_activation=act)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor the weights file must contain (and nothing else)."""
        shapes: dict[str, tuple[int, ...]] = {}
        prev = self.input_size
        for i, h in enumerate(self.hidden_sizes, start=1):
            shapes |= {f"fc{i}.weight": (h, prev), f"fc{i}.bias": (h,), f"ln{i}.weight": (h,), f"ln{i}.bias": (h,)}
            prev = h
        return shapes | {"out.weight": (self.output_size, prev), "out.bias": (self.output_size,)}


class ExpertSpec(_Strict):
    """``expert.json``: what the weights are, which schema layout they expect, and their DP ledger."""

    format: Literal["llamdex.expert"] = FORMAT
    format_version: Literal[1] = FORMAT_VERSION
    schema_name: str
    schema_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    feature_order: list[str] = Field(min_length=1)
    input_columns: list[str] = Field(min_length=1)
    input_size: int = Field(ge=1, le=MAX_WIDTH)
    output_size: int = Field(ge=1, le=MAX_WIDTH)
    hidden_sizes: list[int] = Field(min_length=1, max_length=8)
    output_activation: OutputActivation
    class_names: list[str] = Field(min_length=2)
    dp: DPLedger
    weights_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _consistent(self) -> ExpertSpec:
        p: list[tuple[str, str]] = []
        if len(self.input_columns) != self.input_size:
            p.append(("input_columns", f"has {len(self.input_columns)} entries but input_size is "
                                       f"{self.input_size}; fix: make them agree (one name per input column)"))
        k = len(self.class_names)
        want = 1 if k == 2 else k
        if self.output_size != want:
            p.append(("output_size", f"{k} classes need output_size {want} (1 for binary, K otherwise), "
                                     f"got {self.output_size}; fix: set output_size {want}"))
        if p:
            raise rules_error(p)
        self.arch()  # re-checks widths / activation rules
        return self

    def arch(self) -> ExpertArch:
        """The architecture part of the spec."""
        return ExpertArch(input_size=self.input_size, output_size=self.output_size,
                          hidden_sizes=self.hidden_sizes, output_activation=self.output_activation)

    @classmethod
    def build(cls, schema: TenantSchema | dict | str, arch: ExpertArch, ledger: DPLedger) -> ExpertSpec:
        """Spec for an expert trained on ``schema``'s layout with ``arch``; weights hash set on save."""
        schema = load_schema(schema)
        codec = FeatureCodec(schema)
        return cls(schema_name=schema.name, schema_sha256=schema.sha256(), feature_order=codec.feature_names,
                   input_columns=codec.columns, class_names=codec.class_names, dp=ledger,
                   **arch.model_dump())
