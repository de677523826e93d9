"""The Serve app as users use it: real Ray Serve, real HTTP, the official openai client.

One application (two pools of the tiny random Llama) is deployed for the whole module.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from cluster.registry import Registry
from tests.conftest import METRICS_PORT
from tests.serve_fixtures import BASE_URL, PORT, greedy_with_peft, make_peft_adapter, upload_dir, wait_for

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Tell me about pirates and ships."}]


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    work = tmp_path_factory.mktemp("serve")
    registry = Registry(str(work / "store"))
    _, key_a = registry.create_tenant("acme")
    _, key_b = registry.create_tenant("globex")
    admin = registry.issue_key(None, scope="admin")
    pool = {"model": "tiny-random", "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_ms": 50, "max_new_tokens": 64,
            "bank_poll_s": 1.0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    config = load_app_config({"pools": [{**pool, "name": "small", "latency_tier": 1, "cost_tier": 2},
                                        {**pool, "name": "large", "latency_tier": 2, "cost_tier": 1}],
                              "max_upload_mb": 1, "rate_limit_rpm": 100000})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(work / "store")), name="atelier", route_prefix="/")
    adapters = {name: make_peft_adapter(tiny_model.path, work / name, seed)
                for name, seed in (("pirate", 1), ("weather", 2), ("late", 3))}
    yield {"registry": registry, "acme": key_a, "globex": key_b, "admin": admin, "adapters": adapters,
           "model": tiny_model}
    serve.delete("atelier")


def oa(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=key, max_retries=0)


def http() -> httpx.Client:
    return httpx.Client(base_url=BASE_URL, timeout=120)


@pytest.fixture(scope="module")
def uploaded(app):
    """acme uploads two adapters over HTTP (multipart and JSON+base64)."""
    with http() as c:
        r = upload_dir(c, app["acme"], "acme", "adapters", "pirate", app["adapters"]["pirate"],
                       description="pirate talk: ships, sailing, treasure, parrots and the sea")
        assert r.status_code == 201, r.text
        first = r.json()
        files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in app["adapters"]["weather"].iterdir()
                 if p.suffix in (".json", ".safetensors")}
        r = c.post("/v1/tenants/acme/adapters/weather", headers={"Authorization": f"Bearer {app['acme']}"},
                   json={"files": files, "description": "weather forecasts: rain, temperature, wind and clouds"})
        assert r.status_code == 201, r.text
    return first, r.json()


def test_upload_names_the_version_and_bank(uploaded):
    first, second = uploaded
    assert first["ref"] == "acme/adapter/pirate@1" and first["version"] == 1
    assert {b["pool"] for b in first["banks"]} == {"small", "large"} and all(b["added"] for b in first["banks"])
    assert first["banks"][0]["recon_error_mean"] < 1e-6  # the first adapter of a bank is exact
    assert second["banks"][0]["bank_adapters"] == 2


def test_models_are_listed_per_tenant(app, uploaded):
    acme = {m.id for m in oa(app["acme"]).models.list().data}
    assert {"base", "auto", "acme/pirate", "acme/weather"} <= acme
    globex = {m.id for m in oa(app["globex"]).models.list().data}
    assert globex == {"base", "auto"}
    admin = {m.id for m in oa(app["admin"]).models.list().data}
    assert "acme/pirate" in admin


def test_base_chat_matches_transformers_greedy(app):
    r = oa(app["globex"]).chat.completions.create(model="base", messages=HI, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == greedy_with_peft(app["model"].path, None, HI, 6)
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason in ("stop", "length")


def test_adapter_chat_matches_peft_and_is_isolated(app, uploaded):
    expected = greedy_with_peft(app["model"].path, app["adapters"]["pirate"], HI, 6)
    base = greedy_with_peft(app["model"].path, None, HI, 6)
    assert expected != base, "the test adapter must change the output"
    r = oa(app["acme"]).chat.completions.create(model="acme/pirate", messages=HI, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == expected and r.model == "acme/pirate"
    with pytest.raises(openai.PermissionDeniedError, match="cannot use models of tenant 'acme'"):
        oa(app["globex"]).chat.completions.create(model="acme/pirate", messages=HI, max_tokens=4)


def exported(app, model: str, tmp_path: Path) -> Path | None:
    """The bank's (compressed) version of adapter ``model`` as a PEFT directory; None for base."""
    from cluster.banks import read_bank
    from compression import export_adapter

    if model == "base":
        return None
    bank, _ = read_bank(app["registry"], "small")
    return export_adapter(bank, model, tmp_path / model.replace("/", "_"))


def test_mixed_adapters_in_one_batch(app, uploaded, tmp_path):
    """Concurrent requests for base and two adapters are batched together and each gets its own result."""
    models = ["base", "acme/pirate", "acme/weather"] * 2
    client = oa(app["acme"])

    def ask(model: str) -> str:
        r = client.chat.completions.create(model=model, messages=HI, max_tokens=5, temperature=0)
        return r.choices[0].message.content

    before = serve.get_deployment_handle("pool-small", "atelier").stats.remote().result()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(ask, models))
    after = serve.get_deployment_handle("pool-small", "atelier").stats.remote().result()
    refs = {m: greedy_with_peft(app["model"].path, exported(app, m, tmp_path), HI, 5) for m in set(models)}
    assert answers == [refs[m] for m in models]
    assert after.engine.rows_served - before.engine.rows_served == len(models)
    assert after.engine.batched_steps > before.engine.batched_steps, "requests were not batched"


def test_streaming_chat_and_completions(app, uploaded):
    client = oa(app["acme"])
    stream = client.chat.completions.create(model="acme/pirate", messages=HI, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == greedy_with_peft(app["model"].path, app["adapters"]["pirate"], HI, 6)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_auto_routes_by_description_and_hints(app, uploaded):
    with http() as c:
        def auto(content: str, hints: dict | None = None) -> dict:
            body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
            if hints:
                body["atelier"] = hints
            r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {app['acme']}"})
            assert r.status_code == 200, r.text
            return r.json()

        sea = auto("Will the pirate ships find treasure at sea?")
        assert sea["model"] == "acme/pirate" and sea["atelier"]["routing"]["chosen"] == "acme/pirate"
        rain = auto("Is rain expected tomorrow, and how strong is the wind?")
        assert rain["model"] == "acme/weather"
        other = auto("Compute the integral of x squared.")
        assert other["model"] == "base" and "threshold" in other["atelier"]["routing"]["why"]
        fast = auto("Compute the integral of x squared.", {"latency": "low"})
        cheap = auto("Compute the integral of x squared.", {"cost": "low"})
        assert fast["atelier"]["pool"] == "small" and cheap["atelier"]["pool"] == "large"
        assert "latency_tier" in fast["atelier"]["routing"]["pool_choice"]


def test_auto_learns_from_feedback_and_uses_uploaded_examples(app, uploaded):
    """POST /v1/feedback on an auto response changes the tenant's routing (only its own);
    example prompts uploaded with an adapter are routed by."""
    acme, globex = {"Authorization": f"Bearer {app['acme']}"}, {"Authorization": f"Bearer {app['globex']}"}
    history = "What did real pirate ships look like in the 1700s?"  # a history question the checks let through
    with http() as c:
        def auto(content: str, headers: dict) -> dict:
            r = c.post("/v1/chat/completions", headers=headers, json={
                "model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
            return r.json()

        first = auto(history, acme)
        # the tenant corrects whatever the router chose (the plain embedder sent this history question to the
        # pirate adapter, the intent-tuned default sends it to base): the other label is "right"
        assert first["model"] in ("acme/pirate", "base")
        right = "base" if first["model"] == "acme/pirate" else "acme/pirate"
        r = c.post("/v1/feedback", headers=globex, json={"id": first["id"], "right_model": right})
        assert r.status_code == 404 and r.json()["error"]["param"] == "id"  # another tenant's response
        r = c.post("/v1/feedback", headers=acme, json={"id": first["id"], "right_model": "acme/nope"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "right_model"
        assert c.post("/v1/feedback", headers=acme, json={"id": first["id"]}).status_code == 422
        r = c.post("/v1/feedback", headers=acme, json={"id": first["id"], "right_model": right})
        assert r.status_code == 200, r.text
        veto = [{"label": "acme/pirate", "vote": -1}] if first["model"] == "acme/pirate" else []
        assert r.json()["recorded"] == [{"label": right, "vote": 1}] + veto
        again = auto(history, acme)
        assert again["model"] == right and "feedback_prompt" in again["atelier"]["routing"]["matched"]
        assert auto("Will the pirate ships find treasure at sea?", acme)["model"] == "acme/pirate"

        bad = c.post("/v1/tenants/acme/adapters/sqlhelp", headers=acme, data={"examples": "[1, 2]"},
                     files={"files": ("adapter_config.json", b"{}", "application/json")})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "examples"
        files = [("files", (f.name, f.read_bytes(), "application/octet-stream"))
                 for f in sorted(app["adapters"]["weather"].iterdir()) if f.suffix in (".json", ".safetensors")]
        r = c.post("/v1/tenants/acme/adapters/sqlhelp", headers=acme, files=files, data={
            "description": "SQL helper", "examples": ["Join the orders and customers tables.",
                                                      "Why does my GROUP BY query fail?"]})
        assert r.status_code == 201, r.text
        listing = {m["name"]: m for m in c.get("/v1/tenants/acme/artifacts", headers=acme).json()["data"]}
        assert listing["sqlhelp"]["metadata"]["examples"][1] == "Why does my GROUP BY query fail?"
        sql = wait_for(lambda: (lambda b: b if b["model"] == "acme/sqlhelp" else None)(
            auto("Write a query that counts orders per customer", acme)), timeout_s=20)
        assert sql["atelier"]["routing"]["matched"]["source"] in ("example", "description")


def test_latency_budget_picks_the_cheapest_pool_that_fits(app):
    """max_latency_ms: the cheapest pool whose p50 (as this router measured it) fits, else a stated fallback."""
    client = oa(app["globex"])
    for pool in ("small", "large") * 3:  # give both pools a measured recent p50
        client.chat.completions.create(model="base", messages=HI, max_tokens=2, extra_body={"atelier": {"pool": pool}})
    with http() as c:
        def base(hints: dict) -> dict:
            r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {app['globex']}"},
                       json={"model": "auto", "messages": HI, "max_tokens": 2, "atelier": hints})
            assert r.status_code == 200, r.text
            return r.json()["atelier"]

        roomy = base({"max_latency_ms": 600000})
        assert roomy["pool"] == "large" and "cheapest pool whose recent p50 fits" in roomy["routing"]["pool_choice"]
        assert all(p["samples"] >= 3 and p["p50_ms"] > 0 for p in roomy["routing"]["pools"].values())
        tight = base({"max_latency_ms": 0.01})
        assert tight["routing"]["budget_met"] is False and "fallback" in tight["routing"]["pool_choice"]
        fastest = min(tight["routing"]["pools"], key=lambda n: tight["routing"]["pools"][n]["p50_ms"])
        assert tight["pool"] == fastest
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {app['globex']}"},
                   json={"model": "base", "messages": HI, "atelier": {"max_latency_ms": -1}})
        assert r.status_code == 422 and "max_latency_ms" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers, body, status, fragment", [
    ({}, {"model": "base", "messages": HI}, 401, "missing API key"),
    ({"Authorization": "Bearer atl_nope"}, {"model": "base", "messages": HI}, 401, "unknown or revoked"),
    (None, {"model": "acme/ghost", "messages": HI}, 404, "does not exist"),
    (None, {"model": "ghost", "messages": HI}, 404, "does not exist"),
    (None, {"model": "base", "messages": HI, "temperature": 7}, 422, "temperature"),
    (None, {"model": "base", "messages": []}, 422, "messages"),
    (None, {"model": "base", "messages": HI, "n": 2}, 422, "only n=1"),
    (None, {"model": "base", "messages": HI, "max_tokens": 5000}, 400, "max_tokens 5000 exceeds"),
])
def test_errors_use_the_openai_shape(app, headers, body, status, fragment):
    headers = {"Authorization": f"Bearer {app['acme']}"} if headers is None else headers
    with http() as c:
        r = c.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_upload_refusals(app, tmp_path):
    auth = {"Authorization": f"Bearer {app['acme']}"}
    with http() as c:
        too_big = c.post("/v1/tenants/acme/adapters/big", headers=auth,
                         files={"files": ("adapter_model.safetensors", b"0" * (2 * 1024 * 1024))})
        assert too_big.status_code == 413
        (tmp_path / "adapter_config.json").write_text("{}")
        (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
        r = upload_dir(c, app["acme"], "acme", "adapters", "evil", tmp_path)
        assert r.status_code == 422 and "adapter_model.bin not allowed" in r.json()["error"]["message"]
        r = c.post("/v1/tenants/globex/adapters/x", headers=auth, json={"files": {}})
        assert r.status_code == 403
        schema = json.loads((ROOT / "examples" / "schemas" / "titanic.json").read_text())
        ok = c.post("/v1/tenants/acme/schemas/titanic", headers=auth, json=schema)
        assert ok.status_code == 201 and ok.json()["version"] == 1
        schema["features"][0]["type"] = "complex"
        bad = c.post("/v1/tenants/acme/schemas/titanic", headers=auth, json=schema)
        assert bad.status_code == 422 and "features[0]" in bad.json()["error"]["message"]
        listing = c.get("/v1/tenants/acme/artifacts", headers=auth).json()["data"]
        assert {a["ref"] for a in listing} >= {"acme/schema/titanic@1", "acme/adapter/pirate@1"}


def test_admin_creates_tenants(app):
    with http() as c:
        r = c.post("/v1/admin/tenants", json={"id": "initech"}, headers={"Authorization": f"Bearer {app['admin']}"})
        assert r.status_code == 201 and r.json()["api_key"].startswith("atl_")
        key = r.json()["api_key"]
        assert c.post("/v1/admin/tenants", json={"id": "initech"},
                      headers={"Authorization": f"Bearer {app['admin']}"}).status_code == 409
        assert c.post("/v1/admin/tenants", json={"id": "x2"},
                      headers={"Authorization": f"Bearer {key}"}).status_code == 403
    assert {m.id for m in oa(key).models.list().data} == {"base", "auto"}


def test_new_bank_reaches_replicas_without_failures(app, uploaded):
    """Requests keep flowing while a new adapter is uploaded (new bank version): none fails."""
    client = oa(app["acme"])
    stop = concurrent.futures.Future()
    errors, served = [], []

    def load() -> None:
        while not stop.done():
            try:
                r = client.chat.completions.create(model="acme/pirate", messages=HI, max_tokens=3, temperature=0)
                served.append(r.choices[0].message.content)
            except Exception as exc:  # noqa: BLE001 — any failure is a test failure
                errors.append(repr(exc))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(load) for _ in range(3)]
        with http() as c:
            r = upload_dir(c, app["acme"], "acme", "adapters", "late", app["adapters"]["late"],
                           description="late adapter")
            assert r.status_code == 201, r.text
            version = r.json()["banks"][0]["bank_version"]
        handle = serve.get_deployment_handle("pool-small", "atelier")
        wait_for(lambda: handle.stats.remote().result().bank_version == version, timeout_s=20)
        answer = client.chat.completions.create(model="acme/late", messages=HI, max_tokens=4, temperature=0)
        stop.set_result(True)
        for w in workers:
            w.result()
    assert not errors, errors[:3]
    assert len(served) >= 3
    assert answer.choices[0].message.content == greedy_with_peft(app["model"].path, app["adapters"]["late"], HI, 4)


def test_custom_metrics_are_exported(app, uploaded):
    oa(app["acme"]).chat.completions.create(model="acme/pirate", messages=HI, max_tokens=2)

    def scrape() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        ok = "ray_atelier_requests_total" in text and 'tenant="acme"' in text and "ray_atelier_bank_version" in text
        return text if ok else None

    text = wait_for(scrape, timeout_s=45, interval_s=2)
    assert "ray_atelier_request_latency_s_bucket" in text
