"""The vLLM pool's engine (serve_app.replica.engine_vllm.VLLMEngine, AsyncLLM with its engine core in a
subprocess) with the plugin, against its references, through the engine protocol the replica uses:

* bank adapters (bank layers: shared bases + Σ_i) equal the same adapters as dense vLLM LoRAs and
  the torch pool's engine (TorchEngine + compression's bank), in concurrent mixed requests with
  base rows, max_loras = number of adapters; again after a bank swap (JD-Full K=2 → JD-Diag K=1);
* Llamdex expert rows in the same concurrent mix: the answer (first token, label, probabilities)
  and the continuation equal the torch engine's; ``predict`` equals llamdex's torch ``predict``.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.vllm_plugin.conftest import LAYOUT, MAX_TOKENS, PROMPTS, QUESTIONS

pytestmark = [pytest.mark.slow]


def _request(i: int, **kw):
    from serve_app.wire import GenerationRequest

    return GenerationRequest(request_id=f"r{i}-{kw.get('adapter') or kw.get('expert') or 'base'}",
                             max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **kw)


async def _collect(engine, request, modifiers):
    from serve_app.wire import GenerationResult

    return GenerationResult.collect([e async for e in engine.generate(request, modifiers)])


def test_vllm_pool_engine_serves_bank_and_experts(tiny32, banks, dense_expected, experts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.models import hash_model_dir
    from llamdex.insertion import load_bundle, predict
    from serve_app.replica.engine_torch import TorchEngine
    from serve_app.replica.engine_vllm import VLLMEngine, VLLMOptions
    from serve_app.replica.modifiers import AdapterModifier, ExpertModifier

    tok = AutoTokenizer.from_pretrained(tiny32)
    model = AutoModelForCausalLM.from_pretrained(tiny32).eval()
    bundles = [load_bundle(e, c, hash_model_dir(tiny32)) for e, c in experts]
    keys = ["acme/a@e1.c1", "acme/b@e1.c1"]
    torch_engine = TorchEngine(model, tok)

    def cases(bank):
        """(request, modifiers) per row: PROMPTS with LAYOUT's adapters, then two expert questions."""
        rows = [(_request(i, prompt=p, adapter=None if a is None else bank.adapters[a]),
                 [] if a is None else [AdapterModifier(bank.adapters[a])]) for i, (p, a) in enumerate(zip(PROMPTS, LAYOUT,
                                                                                                        strict=True))]
        rows += [(_request(10 + w, messages=[{"role": "user", "content": QUESTIONS[w]}], expert=keys[w]),
                  [ExpertModifier(keys[w], bundles[w])]) for w in (0, 1)]
        return rows

    async def serve_all(engine, rows):
        return await asyncio.gather(*[_collect(engine, r, m) for r, m in rows])

    engine = VLLMEngine(tiny32, tmp_path / "cache", VLLMOptions(
        dtype="float32", max_lora_rank=8, max_loras=4, max_cpu_loras=16, max_model_len=512, max_num_seqs=12,
        kv_cache_bytes=64 << 20, bank_layers=True, experts=True, max_experts=2))
    tokens: dict[str, list[int]] = {}  # request id -> vLLM's generated token ids (the engine yields text only)
    vllm_generate = engine.engine.generate

    async def recording_generate(prompt, params, request_id, **kwargs):
        async for out in vllm_generate(prompt, params, request_id, **kwargs):
            if out.finished:
                tokens[request_id] = list(out.outputs[0].token_ids)
            yield out

    engine.engine.generate = recording_generate
    try:
        assert engine.capabilities.modifiers == {"adapter", "expert"}

        async def main():
            out = {}
            for version, tag in enumerate(("full", "diag"), start=1):
                bank = banks[tag]
                if version == 1:
                    engine.set_bank(bank, version)
                    torch_engine.set_bank(bank, version)
                else:
                    await engine.swap_bank(bank, version)
                    await torch_engine.swap_bank(bank, version)
                rows = cases(bank)
                served = await serve_all(engine, rows)
                out[tag] = (served, await serve_all(torch_engine, rows), [tokens[r.request_id] for r, _ in rows])
            out["predict"] = [await engine.predict(b, q) for b, q in zip(bundles, QUESTIONS, strict=False)]
            out["memory"] = await engine.adapter_memory()
            return out

        got = asyncio.run(main())
    finally:
        engine.shutdown()
        torch_engine.shutdown()

    for tag in ("full", "diag"):
        served, torch_served, served_tokens = got[tag]
        for row, result in enumerate(served):
            assert result.error is None, result.error
            if row < len(PROMPTS):  # base and bank-adapter rows: the same adapters as dense vLLM LoRAs
                assert served_tokens[row] == dense_expected[tag][row], (tag, row)
            # the torch pool (its detokenizer emits a trailing incomplete UTF-8 byte as U+FFFD, vLLM's holds
            # it back: compare its text with the decoded tokens)
            assert torch_served[row].text == tok.decode(served_tokens[row], skip_special_tokens=True), (tag, row)
            want = torch_served[row].prediction
            if row >= len(PROMPTS):  # expert rows: the same answer, read from vLLM's first-token logprobs
                assert result.prediction is not None and want is not None
                assert (result.prediction.expert, result.prediction.label, result.prediction.answer) == \
                    (want.expert, want.label, want.answer)
                assert result.prediction.probabilities == pytest.approx(want.probabilities, abs=1e-4)
            else:
                assert result.prediction is None and want is None
    assert got["memory"]["bank_bases"] > 0
    for bundle, question, result in zip(bundles, QUESTIONS, got["predict"], strict=False):
        want = predict(model, tok, bundle, question)
        assert result["label"] == want["label"]
        for key in ("probabilities", "expert_probabilities"):
            assert result[key] == pytest.approx(want[key], abs=1e-4), key
        assert result["encoded_features"] == pytest.approx(want["encoded_features"], abs=1e-4)
        assert (result["stated"], result["not_stated"]) == (want["stated"], want["not_stated"])
        assert result["features"].keys() == want["features"].keys() and result["batch_rows"] >= 1
