"""The continuous-batching torch engine against transformers, row by row (no Ray).

Outputs must equal ``model.generate`` for each request alone, whatever joins or leaves the batch,
however prompts are chunked, and with more requests than KV slots.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve_app.replica.engine_api import Engine
from serve_app.replica.engine_torch import TorchEngine, TorchEngineConfig
from serve_app.wire import EngineError, GenerationRequest, GenerationResult
from tests.serve_app.conftest import load, reference

PROMPTS = ["Tell me about pirates and ships.", "hi", "What is the weather like in Paris today, and tomorrow? " * 3,
           "Count: one two three", "Why?", "A much longer question about the history of sailing, " * 6]


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def request(i: int, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=f"r{i}", messages=chat(i), max_tokens=max_tokens, temperature=0, **kw)


async def collect(engine, req: GenerationRequest, modifiers=()) -> GenerationResult:
    return GenerationResult.collect([e async for e in engine.generate(req, modifiers)])


def run(coro):
    return asyncio.run(coro)


@pytest.fixture()
def engine(lively):
    model, tok = load(lively)
    eng = TorchEngine(model, tok, TorchEngineConfig(max_batch_rows=3, prefill_chunk_tokens=16))
    yield eng
    eng.shutdown()


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    caps = engine.capabilities
    assert caps.continuous_batching and caps.modifiers == {"adapter", "expert"} and caps.max_batch_rows == 3


def test_outputs_equal_generate_per_row(engine, lively):
    """8 requests, 3 slots, prompts longer than the 16-token prefill chunk, different lengths."""
    model, tok = load(lively)
    lengths = [5, 9, 3, 12, 7, 4, 10, 6]

    async def main():
        return await asyncio.gather(*[collect(engine, request(i, n)) for i, n in enumerate(lengths)])

    results = run(main())
    stop = engine.stop_ids
    for i, (n, res) in enumerate(zip(lengths, results, strict=True)):
        want = reference(model, tok, chat(i), n, stop)
        assert res.error is None and res.text == want, (i, res.text, want)
        assert res.completion_tokens <= n and res.finish_reason in ("stop", "length")
    assert len({r.text for r in results}) > 3, "the test model must answer prompts differently"
    stats = engine.stats()
    assert stats.rows_served == 8 and stats.running == 0 and stats.batched_steps > 0
    assert stats.peak_batch_rows >= 2 and stats.prefill_forwards > 8  # long prompts were chunked


def test_rows_join_while_others_run(engine, lively):
    """A short request sent while a long one is generating finishes first, with the right answer."""
    model, tok = load(lively)
    order = []

    async def tracked(i, n):
        res = await collect(engine, request(i, n, ignore_eos=True))
        order.append(i)
        return res

    async def main():
        long = asyncio.create_task(tracked(0, 40))
        await asyncio.sleep(0.05)
        short = await tracked(1, 3)
        return await long, short

    long, short = run(main())
    assert order == [1, 0]
    assert short.completion_tokens == 3 and long.completion_tokens == 40


def test_streaming_deltas_and_stop_strings(engine, lively):
    model, tok = load(lively)
    full = reference(model, tok, chat(0), 12, engine.stop_ids)
    assert len(full) > 4
    stop = full[3:5]

    async def main():
        events = [e async for e in engine.generate(request(0, 12, stop=[stop]))]
        return events

    events = run(main())
    text = "".join(e.text for e in events)
    assert text == full[: full.find(stop)] and events[-1].finish_reason == "stop"
    assert all(not e.final for e in events[:-1])


def test_seeded_sampling_is_reproducible(engine):
    async def main(seed):
        req = GenerationRequest(request_id="s", messages=chat(0), max_tokens=10, temperature=1.3, top_p=0.9,
                                seed=seed)
        return (await collect(engine, req)).text

    a, b, c = run(main(1)), run(main(1)), run(main(2))
    assert a == b and a != c


def test_refusals(engine):
    async def main(req, modifiers=()):
        return await collect(engine, req, modifiers)

    with pytest.raises(EngineError, match="not in this replica's bank"):
        from serve_app.replica.modifiers import AdapterModifier

        run(main(request(0, 3), [AdapterModifier("acme/ghost")]))
    long = GenerationRequest(request_id="x", prompt="word " * 3000, max_tokens=2)
    with pytest.raises(EngineError, match="more than this pool's limit"):
        run(main(long))


def test_cancelled_rows_free_their_slot(engine):
    async def main():
        gen = engine.generate(request(0, 200, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.02)
        return engine.stats(), await collect(engine, request(1, 3))

    stats, after = run(main())
    assert stats.running == 0 and after.completion_tokens > 0


def test_tenants_are_served_fairly(lively):
    """One slot; tenant A floods 6 requests, then B sends one: B is admitted second, not seventh."""
    model, tok = load(lively)
    eng = TorchEngine(model, tok, TorchEngineConfig(max_batch_rows=1))
    done = []

    async def one(i, tenant):
        await collect(eng, request(i, 30, ignore_eos=True, tenant=tenant))
        done.append(tenant)

    async def main():
        flood = [asyncio.create_task(one(i, "a")) for i in range(6)]
        while eng.stats().waiting < 5:  # the flood is queued behind the first request
            await asyncio.sleep(0.001)
        await asyncio.gather(one(9, "b"), *flood)

    try:
        run(main())
    finally:
        eng.shutdown()
    assert done.index("b") == 2, done  # FIFO would make it 7th


def test_bfloat16_engine_agrees_with_float32(lively):
    model, tok = load(lively, torch.bfloat16)
    eng = TorchEngine(model, tok, TorchEngineConfig(max_batch_rows=4))
    try:
        got = run(collect(eng, request(0, 6)))
    finally:
        eng.shutdown()
    ref_model, _ = load(lively, torch.bfloat16)
    assert got.text == reference(ref_model, tok, chat(0), 6, eng.stop_ids)
