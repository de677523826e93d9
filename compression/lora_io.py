"""Read and write PEFT LoRA adapter directories as typed, validated factor sets.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` ([r, d_in]) and `...lora_B.weight` ([d_out, r]).
PEFT applies ΔW = scaling · B A with scaling = α/r (α/√r with rslora), per module when
`rank_pattern` / `alpha_pattern` are set. We fold that scaling into B at load time, so every
adapter in this package is just ΔW = B A; adapters with different α/r then compress together
correctly. Pickle weights (`.bin`, `.pt`, ...) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from compression.errors import AdapterFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
# Config fields that change what the adapter computes beyond ΔW = scaling · B A.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "arrow_config",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "kasa_config",
)

Factors = tuple[Tensor, Tensor]  # (B [d_out, r], A [r, d_in]) with the PEFT scaling folded into B
ModuleShapes = Mapping[str, tuple[int, int]]  # module name -> (d_out, d_in)


def check_factors(where: str, B: Tensor, A: Tensor) -> None:
    """Raise AdapterFormatError unless (B, A) is a finite float pair with B [d_out, r], A [r, d_in]."""
    for label, t in (("lora_B", B), ("lora_A", A)):
        if t.dim() != 2:
            raise AdapterFormatError(f"{where}: {label} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise AdapterFormatError(
                f"{where}: {label} has dtype {t.dtype}; LoRA factors must be float (fp32/fp16/bf16)"
            )
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{where}: {label} contains NaN or Inf; re-export a healthy adapter")
    if B.shape[1] != A.shape[0] or B.shape[1] == 0:
        raise AdapterFormatError(
            f"{where}: rank mismatch, lora_B is {tuple(B.shape)} and lora_A is {tuple(A.shape)}; "
            "expected B [d_out, r] and A [r, d_in] with the same r >= 1"
        )


@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter: ΔW_module = B @ A for each targeted module (scaling already folded into B)."""

    name: str
    factors: dict[str, Factors]
    base_model: str | None = None
    target_modules: tuple[str, ...] = ()
    rank: int = 0  # the config's default r; per-module ranks are in `ranks`
    ranks: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.factors:
            raise AdapterFormatError(f"adapter '{self.name}': no LoRA modules (factors is empty)")
        for module, (B, A) in self.factors.items():
            check_factors(f"adapter '{self.name}', module '{module}'", B, A)
        object.__setattr__(self, "ranks", {m: B.shape[1] for m, (B, _) in self.factors.items()})

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (d_out, d_in) of the ΔW this adapter targets."""
        return {m: (B.shape[0], A.shape[1]) for m, (B, A) in self.factors.items()}

    def delta(self, module: str) -> Tensor:
        """Dense ΔW of one module. For tests and debugging only: the algorithms never form it."""
        B, A = self.factors[module]
        return B.float() @ A.float()


def peft_key(module: str, kind: str) -> str:
    """PEFT safetensors key of a LoRA factor: kind 'A' or 'B' of `module`."""
    return f"base_model.model.{module}.lora_{kind}.weight"


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Base model description for validation: every nn.Linear name -> (out_features, in_features).

    Names are `model.named_modules()` names, which is what PEFT puts between `base_model.model.`
    and `.lora_A.weight` when the adapter was trained on this model class.
    """
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def validate_adapter(adapter: LoraAdapter, base_shapes: ModuleShapes) -> None:
    """Raise AdapterFormatError if a module is unknown to the base model or has the wrong shape."""
    for module, shape in adapter.shapes.items():
        if module not in base_shapes:
            near = sorted(m for m in base_shapes if m.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1])[:3]
            raise AdapterFormatError(
                f"adapter '{adapter.name}': module '{module}' is not a Linear of the base model "
                f"(similar names: {near or 'none'}); check that the adapter was trained on this base model"
            )
        if tuple(base_shapes[module]) != shape:
            raise AdapterFormatError(
                f"adapter '{adapter.name}': module '{module}' has ΔW shape (d_out, d_in)={shape} but the "
                f"base Linear is {tuple(base_shapes[module])}; the adapter belongs to a different base model"
            )


def _pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of `module`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: missing {ADAPTER_CONFIG}; a PEFT LoRA directory needs it")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{cfg_path}: invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: top level must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{cfg_path}: field 'peft_type' is {cfg['peft_type']!r}; only 'LORA' is supported"
        )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterFormatError(f"{cfg_path}: field 'r' must be a positive int, got {r!r}")
    if not isinstance(cfg.get("lora_alpha", r), (int, float)):
        raise AdapterFormatError(
            f"{cfg_path}: field 'lora_alpha' must be a number, got {cfg['lora_alpha']!r}"
        )
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise AdapterFormatError(f"{cfg_path}: field '{name}' must be an object, got {cfg[name]!r}")
    for name in _UNSUPPORTED:
        if cfg.get(name):
            raise AdapterFormatError(
                f"{cfg_path}: field '{name}'={cfg[name]!r} is not supported (the adapter is not a plain "
                f"ΔW = B A); retrain or export without it"
            )
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterFormatError(
                f"{path}: only pickle weights found ({', '.join(pickles)}); refusing to unpickle untrusted "
                f"files. Fix: convert them to {ADAPTER_WEIGHTS} in a trusted sandbox "
                "(PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFormatError(f"{path}: missing {ADAPTER_WEIGHTS}")
    try:
        with safe_open(weights, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for a damaged header
        raise AdapterFormatError(f"{weights}: not a readable safetensors file ({e})") from e


def load_peft_adapter(
    path: str | Path, name: str | None = None, base_shapes: ModuleShapes | None = None
) -> LoraAdapter:
    """Load a PEFT LoRA directory into a LoraAdapter with α/r (or α/√r) folded into B, as fp32.

    `base_shapes` (see `linear_shapes`) additionally checks module names and shapes against the
    base model. Raises AdapterFormatError naming the file, field or tensor key at fault.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not a directory; pass the folder holding {ADAPTER_CONFIG}")
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterFormatError(
                f"{path / ADAPTER_WEIGHTS}: unexpected tensor key '{key}'; only "
                "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' are supported"
            )
        pairs.setdefault(m["module"], {})[m["kind"]] = t
    r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
    factors: dict[str, Factors] = {}
    for module, kinds in sorted(pairs.items()):
        if set(kinds) != {"A", "B"}:
            missing = "lora_B" if "A" in kinds else "lora_A"
            raise AdapterFormatError(
                f"{path}: module '{module}' has no {missing} tensor ({peft_key(module, missing[-1])})"
            )
        B, A = kinds["B"], kinds["A"]
        check_factors(f"{path}: module '{module}'", B, A)
        r_m = _pattern_value(cfg.get("rank_pattern") or {}, module, r)
        if B.shape[1] != r_m:
            raise AdapterFormatError(
                f"{path}: module '{module}' has rank {B.shape[1]} but fields 'r'/'rank_pattern' say {r_m}; "
                "fix the config to match the tensors"
            )
        a_m = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
        scaling = a_m / math.sqrt(r_m) if cfg.get("use_rslora") else a_m / r_m
        factors[module] = (B.float() * scaling, A.float())
    if not factors:
        raise AdapterFormatError(f"{path / ADAPTER_WEIGHTS}: contains no LoRA tensors")
    targets = cfg.get("target_modules") or ()
    adapter = LoraAdapter(
        name=name or path.name,
        factors=factors,
        base_model=cfg.get("base_model_name_or_path"),
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
        rank=r,
    )
    if base_shapes is not None:
        validate_adapter(adapter, base_shapes)
    return adapter


def save_peft_adapter(
    factors: Mapping[str, Factors],
    path: str | Path,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write per-module (B, A) as a standard PEFT LoRA directory that PeftModel.from_pretrained loads.

    lora_alpha = r (per module via rank_pattern/alpha_pattern when ranks differ), so PEFT's
    scaling is 1 and the served ΔW is exactly B @ A. target_modules lists the module suffixes
    (e.g. 'q_proj'); PEFT gives any other module with that suffix a zero-initialised B.
    """
    if not factors:
        raise AdapterFormatError("save_peft_adapter: factors is empty; pass at least one module")
    for module, (B, A) in factors.items():
        check_factors(f"save_peft_adapter, module '{module}'", B, A)
    ranks = {m: B.shape[1] for m, (B, _) in factors.items()}
    r = max(Counter(ranks.values()).most_common(), key=lambda kv: (kv[1], kv[0]))[0]
    pattern = {m: rm for m, rm in sorted(ranks.items()) if rm != r}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": pattern,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for module, (B, A) in factors.items():
        tensors[peft_key(module, "A")] = A.detach().to(dtype).contiguous()
        tensors[peft_key(module, "B")] = B.detach().to(dtype).contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
