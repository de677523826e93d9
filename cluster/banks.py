"""Adapter banks in the registry: where they live, adding one adapter, and when to refit.

(Same idea at two layers: the bank itself -- format, fitting, the batched op -- is ``compression``,
e.g. ``compression.bank``; this module keeps banks in the registry.)

A pool's bank is the registry artifact ``system/bank/<bank name>``. When a tenant uploads a
PEFT adapter, :func:`add_to_bank` projects it onto the latest bank's shared bases in closed form;
if the projection's error exceeds the pool's budget, the adapter is stored exactly instead (its
own factors in an exact cluster, ``compression.exact``), so what is served equals what was
uploaded within the budget. The result is published as the next bank version (under a registry
lock, so concurrent uploads never drop each other's adapters). Each version's metadata carries
``exact_params_since_refit``: the numbers stored exactly since the last refit; when they exceed
the policy's share of the bank, :class:`BankUpdate` says a refit is due (the router then queues
a refit of the bank, ``cluster.bank_refit``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cluster.logs import get_logger
from cluster.models import ResolvedModel
from cluster.registry import SYSTEM_TENANT, NotFound, Registry

log = get_logger("banks")


@dataclass(frozen=True)
class RefitPolicy:
    """When an upload makes a refit due: the adapters stored exactly since the last refit hold more than
    ``share`` of the bank's parameters, and the bank has at least ``min_adapters`` adapters (joint
    compression of a handful of adapters saves little). ``share`` None: never."""

    share: float | None = 0.25
    min_adapters: int = 8

    def due(self, adapters: int, bank_params: int, exact_since_refit: int) -> bool:
        return (self.share is not None and adapters >= self.min_adapters
                and exact_since_refit > self.share * bank_params)


@dataclass(frozen=True)
class BankUpdate:
    """What an upload did to one bank: the new version and how the adapter is served."""

    bank: str
    version: int
    adapters: int
    recon_error: dict[str, float]  # per module, of the served form (0 when exact)
    served: str  # "compressed" | "exact"
    projection_error: float | None  # mean error of the projection onto the shared bases (None: none)
    budget: float
    exact_adapters: int
    exact_share: float  # share of the bank's parameters in exact clusters
    bank_rank: int
    refit_due: bool

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


def adapter_sha256(registry: Registry, tenant: str, name: str) -> str:
    """SHA-256 of the latest uploaded weights of adapter ``tenant/name`` (what a bank row must reproduce)."""
    return registry.resolve(tenant, "adapter", name).files["adapter_model.safetensors"].sha256


def place_adapter(bank, adapter, budget: float, model: ResolvedModel, max_rank: int | None = None):
    """(new bank, Placement): ``adapter`` added within ``budget`` (replacing an older copy of it); a new
    bank is pinned to ``model``. Raises ValueError if the bank would exceed ``max_rank`` (a vLLM
    pool's vllm.max_lora_rank)."""
    from compression import add_within_budget, remove_adapter

    if bank is not None and adapter.name in bank.adapters:
        bank = remove_adapter(bank, adapter.name)
    new, placed = add_within_budget(bank, adapter, budget, check_base_model=False, base_model=model.id,
                                    base_model_hash=model.content_hash)
    if max_rank is not None and new.rank > max_rank:
        raise ValueError(f"adapter {adapter.name!r} ({placed.served}) would make the bank rank {new.rank}, above "
                         f"this pool's vllm.max_lora_rank {max_rank}; upload an adapter of rank <= {max_rank} or raise "
                         "the pool's vllm.max_lora_rank")
    return new, placed


def add_to_bank(registry: Registry, bank_name: str, model: ResolvedModel, tenant: str, name: str,
                budget: float | None = None, policy: RefitPolicy | None = None,
                max_rank: int | None = None) -> BankUpdate:
    """Put adapter ``tenant/name`` into the bank within ``budget`` (default
    ``compression.DEFAULT_ERROR_BUDGET``) and publish; say how it is served and whether a refit is due.

    The read-modify-publish runs under a registry lock, so concurrent uploads never drop each
    other's adapters.
    """
    from compression import DEFAULT_ERROR_BUDGET, bank_param_count, exact_param_count

    budget = DEFAULT_ERROR_BUDGET if budget is None else budget
    policy = policy or RefitPolicy()
    adapter = load_registry_adapter(registry, tenant, name, model)
    with registry.lock(f"bank-{bank_name}"):
        bank, base_version = read_bank(registry, bank_name)
        since = bank_metadata(registry, bank_name, base_version).get("exact_params_since_refit", 0) if bank else 0
        new, placed = place_adapter(bank, adapter, budget, model, max_rank)
        if placed.served == "exact":
            since += sum(mb.U.shape[1] + mb.V.shape[1] for mb in new.modules.values()) * new.exact[adapter.name][1]
        params = bank_param_count(new)
        due = policy.due(len(new.adapters), params, since)
        version = publish_bank(registry, bank_name, new, {
            "last_added": adapter.name, "based_on": base_version, "served": placed.served,
            "error_budget": budget, "exact_params_since_refit": since})
    log.info("banks.adapter_added", bank=bank_name, version=version, adapter=adapter.name, served=placed.served,
             projection_error=placed.projection_error, budget=budget, refit_due=due)
    return BankUpdate(bank_name, version, len(new.adapters), new.recon_error[adapter.name], placed.served,
                      placed.projection_error, budget, len(new.exact), exact_param_count(new) / params,
                      new.rank, due)


def bank_metadata(registry: Registry, bank_name: str, version: int | None = None) -> dict:
    """Registry metadata of a bank version (budget, refit bookkeeping); {} if there is no bank."""
    try:
        return dict(registry.resolve(SYSTEM_TENANT, "bank", bank_name, version).metadata)
    except NotFound:
        return {}
