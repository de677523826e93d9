"""Adapter banks in the registry: where they live, and adding one adapter without a refit.

A pool's bank is the registry artifact ``system/bank/<bank name>``. When a tenant uploads a
PEFT adapter, :func:`add_to_bank` projects it onto the latest bank's bases in closed form
(``compression.add_adapter``; the bank job refits the whole collection offline) and publishes
the result as the next bank version. Publishing is optimistic: if another writer published in
between, the update is re-applied on top of theirs, so no adapter is lost.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cluster.logs import get_logger
from cluster.models import ResolvedModel
from cluster.registry import SYSTEM_TENANT, NotFound, Registry

log = get_logger("banks")


@dataclass(frozen=True)
class BankUpdate:
    bank: str
    version: int
    adapters: int
    recon_error: dict[str, float]

    @property
    def mean_error(self) -> float:
        return sum(self.recon_error.values()) / max(len(self.recon_error), 1)


@lru_cache(maxsize=8)
def model_linear_shapes(model_path: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every nn.Linear of a model, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compression import linear_shapes

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_shapes(model)


def load_registry_adapter(registry: Registry, tenant: str, name: str, model: ResolvedModel, version=None):
    """A tenant's adapter artifact as a ``compression.LoraAdapter`` named ``tenant/name``, shape-checked."""
    from compression import load_peft_adapter

    manifest = registry.resolve(tenant, "adapter", name, version)
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in registry.read_all(manifest).items():
            (Path(tmp) / fname).write_bytes(data)
        return load_peft_adapter(tmp, name=f"{tenant}/{name}", base_shapes=model_linear_shapes(str(model.path)))


def read_bank(registry: Registry, bank_name: str, version: int | None = None):
    """(Bank, version) of ``system/bank/<bank_name>``, or (None, None) if there is none yet."""
    from compression import load_bank

    try:
        manifest = registry.resolve(SYSTEM_TENANT, "bank", bank_name, version)
    except NotFound:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in registry.read_all(manifest).items():
            (Path(tmp) / fname).write_bytes(data)
        return load_bank(tmp), manifest.version


def publish_bank(registry: Registry, bank_name: str, bank, metadata: dict | None = None) -> int:
    """Store a ``compression.Bank`` as the next version of ``system/bank/<bank_name>``."""
    from compression import save_bank

    with tempfile.TemporaryDirectory() as tmp:
        save_bank(bank, tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if not p.name.startswith(".")}
    meta = {"adapters": len(bank.adapters), "rank": bank.rank, "clusters": bank.num_clusters,
            "method": bank.method, **(metadata or {})}
    return registry.publish(SYSTEM_TENANT, "bank", bank_name, files, meta).version


def add_to_bank(registry: Registry, bank_name: str, model: ResolvedModel, tenant: str, name: str) -> BankUpdate:
    """Put adapter ``tenant/name`` into the bank (replacing an older copy of it) and publish.

    The read-modify-publish runs under a registry lock, so concurrent uploads never drop each
    other's adapters.
    """
    from compression import add_adapter, compress_collection

    adapter = load_registry_adapter(registry, tenant, name, model)
    with registry.lock(f"bank-{bank_name}"):
        bank, base_version = read_bank(registry, bank_name)
        if bank is None:
            # First adapter of this pool: an exact single-adapter bank at the adapter's own rank.
            new = compress_collection([adapter], rank=max(adapter.ranks.values()), clusters=1, method="full",
                                      base_model=model.id, base_model_hash=model.content_hash)
        else:
            if adapter.name in bank.adapters:
                bank = _without(bank, adapter.name)
            new = add_adapter(bank, adapter, check_base_model=False)
        version = publish_bank(registry, bank_name, new, {"last_added": adapter.name, "based_on": base_version})
    errors = new.recon_error[adapter.name]
    log.info("banks.adapter_added", bank=bank_name, version=version, adapter=adapter.name,
             mean_error=round(sum(errors.values()) / len(errors), 4))
    return BankUpdate(bank_name, version, len(new.adapters), errors)


def _without(bank, name: str):
    """The bank minus adapter ``name`` (a re-upload replaces the old coefficients)."""
    from dataclasses import replace

    i = bank.index(name)
    keep = [j for j in range(len(bank.adapters)) if j != i]
    modules = {m: replace(mb, sigma=mb.sigma[keep]) for m, mb in bank.modules.items()}
    errors = {k: v for k, v in bank.recon_error.items() if k != name}
    return replace(bank, adapters=[bank.adapters[j] for j in keep], clusters=[bank.clusters[j] for j in keep],
                   recon_error=errors, modules=modules)


def bank_summary(registry: Registry, bank_name: str) -> dict | None:
    """bank.json of the latest version (adapter list, errors) without loading tensors."""
    try:
        manifest = registry.resolve(SYSTEM_TENANT, "bank", bank_name)
    except NotFound:
        return None
    return {"version": manifest.version, **json.loads(registry.read_file(manifest, "bank.json"))}
