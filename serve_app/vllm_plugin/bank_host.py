"""Engine side of the bank plugin: basis ids, Σ payloads and what each worker must hold.

A :class:`BankHost` turns a ``compression.Bank`` (any format version: shared and exact clusters
are both ``U_c Σ_i V_cᵀ``) into

* **bases to install** on the workers: each cluster's (U_c, V_c) over all modules, keyed by its
  content, gets a small integer *basis id*. A new bank version whose clusters did not change (an
  adapter projected onto existing bases) installs nothing; a refit installs the new clusters;
* **one LoRA per adapter content**: the Σ-only payload (:mod:`.bank_payload`) naming its basis
  id. Its vLLM ``lora_int_id`` is keyed by (basis, Σ_i), so an adapter unchanged by a bank update
  keeps its id and vLLM's cached copy;
* **bases to drop**: clusters no adapter of the current bank uses and no running request holds
  (requests :meth:`acquire` and :meth:`release` the basis of their adapter).

It does no I/O with vLLM itself; the engine sends :meth:`pending_install` / :meth:`pending_drop`
through ``collective_rpc`` (``atelier_bank_install`` / ``atelier_bank_drop``).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.vllm_plugin.bank_payload import write_payload


@dataclass(frozen=True)
class BankLoRA:
    """What a request needs to use one bank adapter in vLLM."""

    name: str
    lora_int_id: int
    lora_name: str
    path: Path
    basis_id: int


def _digest(*parts: torch.Tensor | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str):
            h.update(p.encode())
        else:
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        h.update(b"\0")
    return h.hexdigest()


def sigma_of(bank, module: str, i: int) -> torch.Tensor:
    """Adapter ``i``'s Σ in ``module`` as the bank layers take it: [r, r] (full, lowrank) or [r] (diag).

    A lowrank bank stores P_i | Q_i ([r, 2R], Σ_i = P_i Q_iᵀ); the payload carries the product (r² numbers,
    the same as JD-Full)."""
    sigma = bank.modules[module].sigma[i]
    if bank.method == "lowrank":
        R = sigma.shape[-1] // 2
        return sigma[:, :R] @ sigma[:, R:].T
    return sigma


class BankHost:
    """Basis ids, payload directories and pending worker operations for one engine's bank."""

    def __init__(self, cache_dir: str | Path, max_rank: int):
        self.cache_dir = Path(cache_dir)
        self.max_rank = max_rank
        self.bank = None
        self.version: int | None = None
        self._lock = threading.Lock()
        self._basis_of_key: dict[str, int] = {}  # cluster content -> basis id
        self._free_ids: list[int] = []
        self._next_basis = 0
        self._current_bases: set[int] = set()  # bases the current bank uses
        self._inflight: dict[int, int] = {}  # basis id -> running requests
        self._installed: set[int] = set()
        self._to_install: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._adapter_basis: list[int] = []  # bank row -> basis id
        self._lora_of_key: dict[str, int] = {}  # (basis, Σ) content -> lora int id
        self._adapter_lora: list[int] = []  # bank row -> lora int id
        self._lora_basis: dict[int, int] = {}
        self._next_lora = 1
        self._installs = 0

    # ---------------------------------------------------------------- bank updates
    def set_bank(self, bank, version: int | None) -> None:
        """Adopt ``bank`` (a compression.Bank or None): assign basis and LoRA ids, queue installs/drops."""
        if bank is not None and bank.rank > self.max_rank:
            raise ValueError(f"bank rank {bank.rank} exceeds this pool's max_lora_rank {self.max_rank}; fix: raise "
                             "the pool's max_lora_rank (vLLM allows 8, 16, 32, 64, 128, 256, ...)")
        with self._lock:
            self.bank, self.version = bank, version
            if bank is None:
                self._current_bases, self._adapter_basis, self._adapter_lora = set(), [], []
                return
            modules = sorted(bank.modules)
            basis_of_cluster: dict[int, int] = {}
            for c in range(bank.num_clusters):
                key = _digest(*(x for m in modules for x in (m, bank.modules[m].U[c], bank.modules[m].V[c])))
                if key not in self._basis_of_key:
                    basis = self._free_ids.pop() if self._free_ids else self._next_id()
                    self._basis_of_key[key] = basis
                    self._to_install[basis] = {m: (bank.modules[m].U[c], bank.modules[m].V[c]) for m in modules}
                basis_of_cluster[c] = self._basis_of_key[key]
            self._adapter_basis = [basis_of_cluster[c] for c in bank.clusters]
            self._current_bases = set(basis_of_cluster.values())
            self._adapter_lora = []
            keep: dict[str, int] = {}
            for i in range(len(bank.adapters)):
                basis = self._adapter_basis[i]
                key = _digest(str(basis), bank.method, *(x for m in modules for x in (m, bank.modules[m].sigma[i])))
                lora = self._lora_of_key.get(key)
                if lora is None:
                    lora, self._next_lora = self._next_lora, self._next_lora + 1
                    self._lora_basis[lora] = basis
                keep[key] = lora
                self._adapter_lora.append(lora)
            self._lora_of_key = keep

    def _next_id(self) -> int:
        basis, self._next_basis = self._next_basis, self._next_basis + 1
        return basis

    def pending_install(self) -> Path | None:
        """A safetensors file with the bases the workers still need (``<id>/<module>/U|V``), or None."""
        with self._lock:
            todo = {b: mods for b, mods in self._to_install.items() if b not in self._installed}
            self._to_install = {}
            if not todo:
                return None
            self._installs += 1
            tensors = {f"{b}/{m}/{w}": t.detach().to("cpu").contiguous()
                       for b, mods in todo.items() for m, (U, V) in mods.items() for w, t in (("U", U), ("V", V))}
            self._installed |= set(todo)
        path = self.cache_dir / "bases" / f"install-{self._installs}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return path

    def pending_drop(self) -> list[int]:
        """Installed bases no adapter of the current bank and no running request uses (now forgotten)."""
        with self._lock:
            drop = sorted(b for b in self._installed if b not in self._current_bases and not self._inflight.get(b))
            self._installed -= set(drop)
            for key in [k for k, b in self._basis_of_key.items() if b in drop]:
                del self._basis_of_key[key]
            self._free_ids.extend(drop)
            return drop

    # ---------------------------------------------------------------- requests
    def names(self) -> list[str]:
        return list(self.bank.adapters) if self.bank is not None else []

    def acquire(self, name: str) -> BankLoRA:
        """The LoRA of adapter ``name`` for one request (payload written on first use); pair with release."""
        with self._lock:
            if self.bank is None:
                raise KeyError(f"adapter {name!r}: no bank is loaded")
            i = self.bank.index(name)
            basis, lora = self._adapter_basis[i], self._adapter_lora[i]
            if basis not in self._installed:
                raise RuntimeError(f"adapter {name!r}: its basis {basis} is not installed yet (send "
                                   "pending_install() to the workers after set_bank)")
            self._inflight[basis] = self._inflight.get(basis, 0) + 1
            bank = self.bank
        path = self.cache_dir / "payloads" / str(lora)
        if not (path / "adapter_config.json").is_file():
            sigmas = {m: sigma_of(bank, m, i) for m in sorted(bank.modules)}
            nonzero = {m: s for m, s in sigmas.items() if bool(s.any())} or dict([next(iter(sigmas.items()))])
            write_payload(path, nonzero, basis, bank.rank)
        return BankLoRA(name, lora, f"{name}@{lora}", path, basis)

    def release(self, lora: BankLoRA) -> None:
        """A request using ``lora`` finished."""
        with self._lock:
            left = self._inflight.get(lora.basis_id, 0) - 1
            if left > 0:
                self._inflight[lora.basis_id] = left
            else:
                self._inflight.pop(lora.basis_id, None)

    def prune_payloads(self) -> None:
        """Delete payload directories of LoRA ids the current bank no longer uses (not running)."""
        with self._lock:
            live = set(self._adapter_lora)
            busy = {lid for lid, b in self._lora_basis.items() if self._inflight.get(b)}
        root = self.cache_dir / "payloads"
        for d in root.iterdir() if root.is_dir() else ():
            if d.name.isdigit() and int(d.name) not in live and int(d.name) not in busy:
                shutil.rmtree(d, ignore_errors=True)
