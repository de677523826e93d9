"""The compressed LoRA bank: typed in-memory form, validation and its on-disk format.

A bank directory holds `bank.safetensors` (per module: `<module>.U` [K, d_out, r], `<module>.V`
[K, d_in, r], `<module>.sigma` [n, r, r] for JD-Full, [n, r] for JD-Diag or [n, r, 2R] for lowrank)
and `bank.json`, the manifest (fields, adapter order, clusters, errors, module shapes and the
sha256 of the tensors).
The manifest is written last via a temp file + os.replace, so a directory with a bank.json is a
complete bank; load_bank refuses anything inconsistent, naming the field or tensor at fault.

Clusters are *shared* (a fitted basis, adapters projected onto it) or *exact* (format v2): an exact
cluster's columns hold the uploaded factors of one or more adapters side by side (adapter → its
column slot in ``exact``), with Σ = identity on the slot, so U Σ_i Vᵀ = B_i A_i exactly. Both
kinds go through the same batched op and the same export; ``compression.exact`` builds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from compression.errors import BankFormatError
from compression.jd import METHODS, Method

BANK_WEIGHTS = "bank.safetensors"
BANK_MANIFEST = "bank.json"
FORMAT = "atelier-lora-bank"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: no exact clusters
_TENSORS = ("U", "V", "sigma")


@dataclass(frozen=True)
class ModuleBank:
    """Shared bases of one module for all K clusters, and every adapter's coefficients."""

    U: Tensor  # [K, d_out, r]
    V: Tensor  # [K, d_in, r]
    sigma: Tensor  # [n, r, r] (full), [n, r] (diag) or [n, r, 2R] (lowrank: P | Q, Σ_i = P_i Q_iᵀ)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the module's ΔW."""
        return self.U.shape[1], self.V.shape[1]


@dataclass(frozen=True)
class Bank:
    """n adapters compressed into K clusters: ΔW_i[module] ≈ U[c_i] Σ_i V[c_i]ᵀ. Validated on creation."""

    base_model: str
    base_model_hash: str
    method: Method
    rank: int
    num_clusters: int
    adapters: list[str]  # index order: row i of every sigma
    clusters: list[int]  # adapter index -> cluster
    recon_error: dict[str, dict[str, float]]  # adapter -> module -> squared relative error
    modules: dict[str, ModuleBank]
    exact: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # adapter -> (column offset, width)

    def __post_init__(self) -> None:
        validate_bank(self)

    @property
    def target_modules(self) -> list[str]:
        return list(self.modules)

    @property
    def exact_clusters(self) -> set[int]:
        """Clusters that hold uploaded factors verbatim (never a projection target)."""
        return {c for a, c in zip(self.adapters, self.clusters, strict=True) if a in self.exact}

    @property
    def shared_clusters(self) -> list[int]:
        """Clusters with a fitted basis that new adapters may be projected onto."""
        exact = self.exact_clusters
        return [c for c in range(self.num_clusters) if c not in exact]

    def index(self, name: str) -> int:
        """Row of adapter `name`; KeyError naming the known adapters if absent."""
        try:
            return self.adapters.index(name)
        except ValueError:
            raise KeyError(
                f"adapter {name!r} is not in the bank ({len(self.adapters)} adapters, "
                f"e.g. {self.adapters[:3]})"
            ) from None


def _fail(field: str, problem: str) -> BankFormatError:
    return BankFormatError(f"bank field '{field}': {problem}")


def _check_type(field: str, value: object, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _fail(field, f"must be {getattr(kind, '__name__', kind)}, got {value!r}")


def validate_bank(bank: Bank) -> None:
    """Raise BankFormatError unless every field is typed, every tensor shaped and finite, all consistent."""
    for field in ("base_model", "base_model_hash"):
        _check_type(field, getattr(bank, field), str)
    if bank.method not in METHODS:
        raise _fail("method", f"must be one of {METHODS}, got {bank.method!r}")
    for field in ("rank", "num_clusters"):
        _check_type(field, getattr(bank, field), int)
        if getattr(bank, field) < 1:
            raise _fail(field, f"must be >= 1, got {getattr(bank, field)}")
    _check_type("adapters", bank.adapters, list)
    if not all(isinstance(a, str) for a in bank.adapters) or len(set(bank.adapters)) != len(bank.adapters):
        raise _fail("adapters", "must be a list of unique strings")
    n, K, r = len(bank.adapters), bank.num_clusters, bank.rank
    _check_type("clusters", bank.clusters, list)
    if len(bank.clusters) != n or not all(isinstance(c, int) and 0 <= c < K for c in bank.clusters):
        raise _fail(
            "clusters", f"must list one cluster id in [0, {K}) per adapter ({n}), got {bank.clusters}"
        )
    if not bank.modules:
        raise _fail("modules", "a bank needs at least one module")
    for module, mb in bank.modules.items():
        if mb.U.dim() != 3 or mb.V.dim() != 3:
            raise _fail(
                f"{module}.U/V", f"must be 3-D [K, d, r], got {tuple(mb.U.shape)} / {tuple(mb.V.shape)}"
            )
        d_out, d_in = mb.shape
        R2 = mb.sigma.shape[-1] if mb.sigma.dim() == 3 else 0  # lowrank: P | Q, 2R columns
        sigma_shape = {"full": (n, r, r), "diag": (n, r), "lowrank": (n, r, max(2, R2 + R2 % 2))}[bank.method]
        for name, t, want in (
            ("U", mb.U, (K, d_out, r)),
            ("V", mb.V, (K, d_in, r)),
            ("sigma", mb.sigma, sigma_shape),
        ):
            if tuple(t.shape) != want:
                raise _fail(
                    f"{module}.{name}",
                    f"shape {tuple(t.shape)}, expected {want} (method={bank.method}, "
                    f"rank={r}, num_clusters={K}, adapters={n})",
                )
            if not t.is_floating_point() or not t.isfinite().all():
                raise _fail(f"{module}.{name}", f"must be finite floats (dtype {t.dtype})")
    _validate_exact(bank)
    _check_type("recon_error", bank.recon_error, dict)
    if set(bank.recon_error) != set(bank.adapters):
        raise _fail("recon_error", "must have exactly one entry per adapter")
    for adapter, errors in bank.recon_error.items():
        if not isinstance(errors, dict) or set(errors) != set(bank.modules):
            raise _fail(f"recon_error.{adapter}", "must map every bank module to its error")
        if not all(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in errors.values()):
            raise _fail(f"recon_error.{adapter}", f"errors must be finite numbers >= 0, got {errors}")


def _validate_exact(bank: Bank) -> None:
    """Exact slots: known adapters, inside [0, rank), disjoint per cluster, clusters not shared."""
    _check_type("exact", bank.exact, dict)
    slots: dict[int, list[tuple[int, int, str]]] = {}
    cluster_of = dict(zip(bank.adapters, bank.clusters, strict=True))
    for adapter, slot in bank.exact.items():
        if adapter not in cluster_of:
            raise _fail(f"exact.{adapter}", "names an adapter that is not in the bank")
        if (not isinstance(slot, (tuple, list)) or len(slot) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in slot)):
            raise _fail(f"exact.{adapter}", f"must be [offset, width] integers, got {slot!r}")
        offset, width = slot
        if offset < 0 or width < 1 or offset + width > bank.rank:
            raise _fail(f"exact.{adapter}", f"slot [{offset}, {offset + width}) is outside [0, rank={bank.rank})")
        slots.setdefault(cluster_of[adapter], []).append((offset, width, adapter))
    for cluster, taken in slots.items():
        taken.sort()
        for (o1, w1, a1), (o2, _, a2) in zip(taken, taken[1:], strict=False):
            if o1 + w1 > o2:
                raise _fail(f"exact.{a2}", f"slot overlaps adapter {a1!r}'s in cluster {cluster}")
    mixed = [a for a, c in zip(bank.adapters, bank.clusters, strict=True) if c in slots and a not in bank.exact]
    if mixed:
        raise _fail("exact", f"exact clusters hold only exact adapters; {mixed[:3]} are projected into one")


def exact_param_count(bank: Bank) -> int:
    """Numbers the bank spends on exact clusters: their U and V columns and their adapters' Σ rows."""
    exact = sorted(bank.exact_clusters)
    rows = [i for i, a in enumerate(bank.adapters) if a in bank.exact]
    return sum(mb.U[exact].numel() + mb.V[exact].numel() + mb.sigma[rows].numel() for mb in bank.modules.values())


def bank_param_count(bank: Bank) -> int:
    """Numbers stored by the bank: Σ_modules K·(d_out + d_in)·r + n·r² (full), n·r (diag) or n·2rR (lowrank)."""
    return sum(mb.U.numel() + mb.V.numel() + mb.sigma.numel() for mb in bank.modules.values())


def mean_recon_errors(bank: Bank) -> list[float]:
    """Per adapter (bank order): the mean over modules of its squared relative reconstruction error."""
    return [sum(e.values()) / len(e) for e in (bank.recon_error[a] for a in bank.adapters)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_bank(bank: Bank, path: str | Path) -> Path:
    """Write bank.safetensors, then the bank.json manifest (atomically, last). Returns the directory."""
    validate_bank(bank)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / BANK_MANIFEST).unlink(
        missing_ok=True
    )  # the directory is "incomplete" until the new manifest lands
    tensors = {f"{m}.{t}": getattr(mb, t).contiguous() for m, mb in bank.modules.items() for t in _TENSORS}
    _write_atomic(path / BANK_WEIGHTS, lambda p: save_file(tensors, str(p)))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": bank.base_model,
        "base_model_hash": bank.base_model_hash,
        "method": bank.method,
        "rank": bank.rank,
        "num_clusters": bank.num_clusters,
        "adapters": bank.adapters,
        "clusters": bank.clusters,
        "module_shapes": {m: list(mb.shape) for m, mb in bank.modules.items()},
        "recon_error": bank.recon_error,
        "exact": {a: list(slot) for a, slot in bank.exact.items()},
        "weights_sha256": _sha256(path / BANK_WEIGHTS),
    }
    _write_atomic(path / BANK_MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
    return path


def load_bank(path: str | Path) -> Bank:
    """Read and fully validate a bank directory written by save_bank. Raises BankFormatError."""
    path = Path(path)
    manifest_path, weights_path = path / BANK_MANIFEST, path / BANK_WEIGHTS
    if not manifest_path.is_file():
        raise BankFormatError(f"{path}: missing {BANK_MANIFEST}; the bank is incomplete, re-run save_bank")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise BankFormatError(f"{manifest_path}: invalid JSON ({e})") from e
    _check_type("<manifest>", manifest, dict)
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise _fail(
            "format/version",
            f"expected {FORMAT!r} v{'/'.join(map(str, READABLE_VERSIONS))}, got {manifest.get('format')!r} "
            f"v{manifest.get('version')!r}",
        )
    for field, kind in (("module_shapes", dict), ("weights_sha256", str)):
        _check_type(field, manifest.get(field), kind)
    if not weights_path.is_file():
        raise BankFormatError(f"{path}: missing {BANK_WEIGHTS}")
    if _sha256(weights_path) != manifest["weights_sha256"]:
        raise _fail(
            "weights_sha256",
            f"{BANK_WEIGHTS} does not match {BANK_MANIFEST}: the files come from "
            "different saves or the tensors are corrupted; re-run save_bank",
        )
    with safe_open(weights_path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shapes = manifest["module_shapes"]
    expected = {f"{m}.{t}" for m in shapes for t in _TENSORS}
    if set(tensors) != expected:
        raise _fail(
            "module_shapes",
            f"tensors missing {sorted(expected - set(tensors))[:5]}, "
            f"unexpected {sorted(set(tensors) - expected)[:5]}",
        )
    modules = {m: ModuleBank(*(tensors[f"{m}.{t}"] for t in _TENSORS)) for m in shapes}
    for m, shape in shapes.items():
        if list(modules[m].shape) != shape:
            raise _fail(f"module_shapes.{m}", f"manifest says {shape}, tensors are {list(modules[m].shape)}")
    fields = (
        "base_model",
        "base_model_hash",
        "method",
        "rank",
        "num_clusters",
        "adapters",
        "clusters",
        "recon_error",
    )
    missing = [f for f in fields if f not in manifest]
    if missing:
        raise _fail(missing[0], f"missing from {BANK_MANIFEST}")
    exact = manifest.get("exact", {})
    _check_type("exact", exact, dict)
    exact = {a: tuple(slot) if isinstance(slot, list) else slot for a, slot in exact.items()}
    return Bank(**{f: manifest[f] for f in fields}, modules=modules, exact=exact)
