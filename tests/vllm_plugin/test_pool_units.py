"""The pool side of the plugin without an engine: expert slot loading under concurrency, eviction,
failed loads, and the bank's install/drop calls (the worker RPCs recorded)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve_app.vllm_plugin.pool import PluginBank, PluginExperts


def _bundle(name: str):
    spec = SimpleNamespace(base_model_hash="h" * 16, class_token_ids=[5, 6], num_slots=2)
    return SimpleNamespace(origin=(f"/e/{name}", f"/c/{name}"), spec=spec)


class Workers:
    """Records the RPCs; a load takes a moment (so concurrent requests overlap) and may fail once."""

    def __init__(self, fail_first_load: bool = False):
        self.calls: list[tuple[str, tuple]] = []
        self.fail = fail_first_load

    async def __call__(self, method: str, args: tuple) -> list:
        self.calls.append((method, args))
        await asyncio.sleep(0.02)
        if method == "atelier_expert_load" and self.fail:
            self.fail = False
            raise RuntimeError("worker could not read the connectors")
        return [{}]


def test_concurrent_first_requests_load_an_expert_once_and_eviction_unloads():
    workers = Workers()
    experts = PluginExperts(max_experts=1, rpc=workers)
    a, b = _bundle("a"), _bundle("b")

    async def ask(bundle):
        async with experts.request(bundle, [1, 2, 3]) as inputs:
            await asyncio.sleep(0.01)
            return inputs.prompt["multi_modal_data"]["image"]["atelier_expert"].item(), inputs.nonce

    async def main():
        first = await asyncio.gather(*[ask(a) for _ in range(3)])
        second = await ask(b)  # the only slot: a is unloaded first (no request holds it now)
        return first, second

    first, (slot_b, _) = asyncio.run(main())
    assert [m for m, _ in workers.calls] == ["atelier_expert_load", "atelier_expert_unload", "atelier_expert_load"]
    assert workers.calls[0][1] == (0, "/e/a", "/c/a", "h" * 16)
    assert {s for s, _ in first} == {0} and slot_b == 0
    assert len({n for _, n in first}) == 3  # one nonce per request


def test_a_failed_load_frees_the_slot_and_the_next_request_retries():
    workers = Workers(fail_first_load=True)
    experts = PluginExperts(max_experts=1, rpc=workers)

    async def main():
        with pytest.raises(RuntimeError, match="connectors"):
            async with experts.request(_bundle("a"), [1]):
                pass
        async with experts.request(_bundle("a"), [1]) as inputs:
            return inputs

    assert asyncio.run(main()).nonce >= 1
    assert [m for m, _ in workers.calls] == ["atelier_expert_load", "atelier_expert_load"]


def test_bank_installs_before_the_first_request_and_drops_after_a_swap(tmp_path):
    from compression import compress_collection
    from compression.synthetic_adapters import synthetic_collection

    adapters = synthetic_collection(6, {"layers.0.q_proj": (24, 16)}, clusters=2, r0=2, seed=0).adapters
    workers = Workers()
    bank = PluginBank(tmp_path, max_rank=4, rpc=workers)
    bank.set_bank(compress_collection(adapters, rank=4, clusters=2, method="full", seed=0), 1)
    assert workers.calls == []  # nothing reaches the workers before it is needed

    async def main():
        async with bank.lora(adapters[0].name) as lora:
            held = lora
            bank.set_bank(compress_collection(adapters, rank=4, clusters=1, method="diag", seed=0), 2)
            await bank.sync()  # the new basis is installed; the old ones wait for the running request
        await bank.sync()
        return held

    lora = asyncio.run(main())
    methods = [m for m, _ in workers.calls]
    # the unused JD-Full basis goes at the swap, the running request's one after the request
    assert methods == ["atelier_bank_install", "atelier_bank_install", "atelier_bank_drop", "atelier_bank_drop"]
    held_basis = bank.host._lora_basis[lora.lora_int_id]
    assert workers.calls[2][1][0] == [1 - held_basis] and workers.calls[3][1][0] == [held_basis]
    assert lora.lora_int_id >= 1 and (tmp_path / "payloads").is_dir()


def test_bank_ops_bench_smoke(tmp_path):
    import json

    from bench.vllm_bank_ops import main

    main(["--tokens", "4,8", "--reps", "3", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "vllm_bank_ops.json").read_text())["results"]
    assert [r["tokens"] for r in rows] == [4, 8] and all(r["bank_us"] > 0 and r["vllm_us"] > 0 for r in rows)
    assert "| 8 |" in (tmp_path / "vllm_bank_ops.md").read_text()
