"""The vLLM pool's side of the plugin: the bank and the experts of one ``AsyncLLM``.

:class:`PluginBank` keeps a :class:`~serve_app.vllm_plugin.bank_host.BankHost` in step with the
engine's workers (installs new cluster bases, drops unused ones, through ``collective_rpc``) and
hands out one ``LoRARequest`` per request (a Σ-only payload). :class:`PluginExperts` loads expert
bundles into worker slots (once per bundle, concurrent first requests wait for the one load),
builds an expert request's vLLM inputs and reads back what the encoder read.

Both talk to vLLM only through ``rpc(method, args) -> awaitable list`` (one entry per worker), so
they work with any engine that has the plugin's worker extension.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from serve_app.vllm_plugin.bank_host import BankHost
from serve_app.vllm_plugin.expert_host import ExpertHost, ExpertInputs

Rpc = Callable[[str, tuple], Awaitable[list]]


class PluginBank:
    """The bank as the plugin's bank layers serve it: bases installed once, Σ payloads per request."""

    def __init__(self, cache_dir: Path, max_rank: int, rpc: Rpc):
        self.host = BankHost(cache_dir, max_rank)
        self.rpc = rpc
        self._lock = asyncio.Lock()

    def set_bank(self, bank, version: int | None) -> None:
        """Adopt ``bank`` (bases reach the workers on the next :meth:`sync`)."""
        self.host.set_bank(bank, version)

    def names(self) -> list[str]:
        return self.host.names()

    async def sync(self) -> None:
        """Install the bases the current bank needs and drop those nothing uses any more."""
        async with self._lock:
            path = await asyncio.to_thread(self.host.pending_install)
            if path is not None:
                await self.rpc("atelier_bank_install", (str(path),))
            drop = self.host.pending_drop()
            if drop:
                await self.rpc("atelier_bank_drop", (drop,))
                await asyncio.to_thread(self.host.prune_payloads)

    @asynccontextmanager
    async def lora(self, name: str) -> AsyncIterator[Any]:
        """The ``LoRARequest`` of adapter ``name`` for one request (its basis stays installed meanwhile)."""
        from vllm.lora.request import LoRARequest

        await self.sync()
        lease = await asyncio.to_thread(self.host.acquire, name)
        try:
            yield LoRARequest(lease.lora_name, lease.lora_int_id, str(lease.path))
        finally:
            self.host.release(lease)


class PluginExperts:
    """Llamdex bundles in the workers' expert slots (LRU of ``max_experts``) and their requests."""

    def __init__(self, max_experts: int, rpc: Rpc):
        self.host = ExpertHost(max_experts)
        self.rpc = rpc
        self._loading: dict[str, asyncio.Future] = {}

    @staticmethod
    def _key(bundle) -> str:
        if bundle.origin is None:
            raise ValueError("this expert bundle was not loaded from artifact directories (llamdex.insertion."
                             "load_bundle), so the vLLM workers cannot load it")
        return "|".join(bundle.origin)

    async def _slot(self, bundle) -> int:
        """A worker slot holding ``bundle``, acquired for one request (loaded on first use)."""
        key = self._key(bundle)
        while key in self._loading:  # another request is loading it: wait, then look again
            await asyncio.shield(self._loading[key])
        slot, load, evicted = self.host.slot(key)
        self.host.acquire(slot)
        if not load:
            return slot
        future = self._loading[key] = asyncio.get_running_loop().create_future()
        try:
            if evicted:
                await self.rpc("atelier_expert_unload", (evicted,))
            await self.rpc("atelier_expert_load", (slot, *bundle.origin, bundle.spec.base_model_hash))
        except BaseException:
            self.host.release(slot)
            self.host.forget(key)
            raise
        finally:
            del self._loading[key]
            future.set_result(None)
        return slot

    @asynccontextmanager
    async def request(self, bundle, prompt_ids: list[int]) -> AsyncIterator[ExpertInputs]:
        """vLLM inputs of one expert request (the bundle stays in its slot meanwhile)."""
        slot = await self._slot(bundle)
        try:
            yield self.host.inputs(slot, bundle, prompt_ids)
        finally:
            self.host.release(slot)

    async def read(self, nonce: int) -> dict | None:
        """What the encoder read for request ``nonce`` (None if it never reached the workers)."""
        return (await self.rpc("atelier_expert_results", ([nonce],)))[0].get(nonce)
