"""Llamdex experts served over real HTTP: chat (plain and streamed), completions, predict,
isolation, refusals, batched mixed waves, hot swaps, the LRU and its metrics.

Connectors are really trained (seconds, tiny-random, toy schema); the tenant uploads its schema
and expert over HTTP, the admin uploads the connectors (as the connectors job would publish them).
"""

from __future__ import annotations

import concurrent.futures
import copy
import json

import httpx
import openai
import pytest
import torch
from ray import serve

from cluster.registry import Registry
from serve_app.wire import PredictCall
from tests.conftest import METRICS_PORT
from tests.serve_fixtures import (
    BASE_URL,
    PORT,
    expert_reference,
    make_peft_adapter,
    train_tiny_connectors,
    upload_dir,
    wait_for,
)

pytestmark = pytest.mark.ray
APP = "experts"
SCHEMA = {
    "name": "titanic", "description": "Passengers of the RMS Titanic", "subject": "passenger",
    "features": [
        {"name": "age", "type": "int", "range": [0, 100], "unit": "years", "description": "age of the passenger"},
        {"name": "fare", "type": "float", "range": [0, 600], "unit": "pounds", "description": "ticket price",
         "decimals": 2},
        {"name": "sex", "type": "category", "categories": ["male", "female"], "description": "sex"},
        {"name": "alone", "type": "bool", "description": "travelling alone"},
    ],
    "target": {"name": "survived", "question": "Did the passenger survive?",
               "classes": [{"name": "no", "description": "did not survive"},
                           {"name": "yes", "description": "survived"}]},
}
Q = "A 30 year old man, fare 7.25 pounds, travelling alone. Did the passenger survive?"
Q2 = "She is 40 and paid 80 pounds for her ticket. Did she survive?"


def oa(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=key, max_retries=0, timeout=120)


def http() -> httpx.Client:
    return httpx.Client(base_url=BASE_URL, timeout=120)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def pool_stats() -> dict:
    return serve.get_deployment_handle("pool-small", APP).stats.remote().result().model_dump()


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    work = tmp_path_factory.mktemp("serve-experts")
    expert_dir, connectors_dir, trained = train_tiny_connectors(tiny_model, SCHEMA, work / "trained")
    registry = Registry(str(work / "store"))
    _, key_a = registry.create_tenant("acme")
    _, key_b = registry.create_tenant("globex")
    admin = registry.issue_key(None, scope="admin")
    config = load_app_config({"pools": [{
        "name": "small", "model": "tiny-random", "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_ms": 100,
        "max_new_tokens": 32, "max_experts_per_replica": 2, "bank_poll_s": 1.0,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}], "rate_limit_rpm": 100000})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(work / "store")), name=APP, route_prefix="/")
    with http() as c:
        r = c.post("/v1/tenants/acme/schemas/titanic", headers=bearer(key_a), json=SCHEMA)
        assert r.status_code == 201, r.text
        r = upload_dir(c, key_a, "acme", "experts", "survival", expert_dir, description="titanic survival")
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        r = upload_dir(c, admin, "acme", "connectors", "survival", connectors_dir)
        assert r.status_code == 201 and r.json()["version"] == 1, r.text
        r = upload_dir(c, key_a, "acme", "adapters", "pirate", make_peft_adapter(tiny_model.path, work / "pirate", 1),
                       description="pirate talk: ships, sailing, treasure and the sea")
        assert r.status_code == 201, r.text
    yield {"registry": registry, "acme": key_a, "globex": key_b, "admin": admin, "model": tiny_model,
           "expert_dir": expert_dir, "connectors_dir": connectors_dir, "trained": trained, "work": work}
    serve.delete(APP)


def predict(key: str, question: str = Q, model: str = "acme/survival") -> httpx.Response:
    with http() as c:
        return c.post(f"/v1/experts/{model}/predict", headers=bearer(key), json={"question": question})


def test_expert_is_listed_with_versions(app):
    cards = {m.id: m for m in oa(app["acme"]).models.list().data}
    info = cards["acme/survival"].model_extra["atelier"]
    assert info["kind"] == "expert" and info["pools"] == ["small"]
    assert (info["expert_version"], info["connectors_version"], info["base_model"]) == (1, 1, "tiny-random")
    assert "acme/survival" not in {m.id for m in oa(app["globex"]).models.list().data}


def test_predict_matches_llamdex_in_process(app):
    from cluster.models import load_model
    from llamdex.insertion import load_bundle
    from llamdex.insertion import predict as local_predict

    r = predict(app["acme"])
    assert r.status_code == 200, r.text
    body = r.json()
    model, tok = load_model(app["model"])
    bundle = load_bundle(app["expert_dir"], app["connectors_dir"], app["model"].content_hash)
    want = local_predict(model, tok, bundle, Q)
    assert body["label"] == want["label"] and body["features"] == want["features"]
    for field in ("probabilities", "expert_probabilities"):
        assert body[field] == pytest.approx(want[field], abs=1e-5)
    assert body["versions"] == {"expert": 1, "connectors": 1, "key": "acme/survival@e1.c1"}
    assert body["object"] == "expert.prediction" and body["pool"] == "small" and body["usage"]["prompt_tokens"] > 10
    assert set(body["features"]) == {"age", "fare", "sex", "alone"}
    assert (body["stated"], body["not_stated"]) == (want["stated"], want["not_stated"])  # issue 16
    assert body["read_by_meaning"] == want["read_by_meaning"]
    assert sorted(body["stated"] + body["not_stated"]) == sorted(body["features"])
    assert all(body["features"][k] is None for k in body["not_stated"])


def test_expert_chat_plain_and_streamed(app):
    want_pred, want_text = expert_reference(app["model"].path, app["expert_dir"], app["connectors_dir"], Q, 8)
    client = oa(app["acme"])
    messages = [{"role": "system", "content": "ignored for experts"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": Q}]
    r = client.chat.completions.create(model="acme/survival", messages=messages, max_tokens=8, temperature=0)
    atelier = r.model_extra["atelier"]
    assert r.choices[0].message.content == want_text and want_text.startswith(want_pred["answer"])
    pred = atelier["prediction"]
    assert pred["label"] == want_pred["label"] and pred["answer"] == want_pred["answer"]
    assert pred["probabilities"] == pytest.approx(want_pred["probabilities"], abs=1e-5)
    assert atelier["kind"] == "expert" and atelier["expert_key"] == "acme/survival@e1.c1"
    assert pred["label"] == predict(app["acme"]).json()["label"]  # chat and predict agree
    chunks = list(client.chat.completions.create(model="acme/survival", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_text
    assert chunks[-1].model_extra["atelier"]["prediction"]["label"] == pred["label"]
    # sampling does not change the answer word (the prediction), only what may follow it
    hot = client.chat.completions.create(model="acme/survival", messages=messages, max_tokens=8, temperature=1.5,
                                         seed=7)
    assert hot.choices[0].message.content.startswith(want_pred["answer"])
    done = client.completions.create(model="acme/survival", prompt=Q, max_tokens=8, temperature=0)
    assert done.choices[0].text == want_text and done.model_extra["atelier"]["prediction"]["label"] == pred["label"]


def test_isolation_and_refusals(app):
    with pytest.raises(openai.PermissionDeniedError, match="cannot use models of tenant 'acme'"):
        oa(app["globex"]).chat.completions.create(model="acme/survival", messages=[{"role": "user", "content": Q}])
    r = predict(app["globex"])
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert predict(app["admin"]).status_code == 200  # the admin key may use any tenant's expert
    assert predict(app["acme"], model="acme/ghost").status_code == 404
    r = predict(app["acme"], model="acme/pirate")
    assert r.status_code == 400 and "not an expert" in r.json()["error"]["message"]
    with http() as c:
        r = c.post("/v1/experts/acme/survival/predict", headers=bearer(app["acme"]), json={"question": ""})
        assert r.status_code == 422 and r.json()["error"]["param"] == "question"
        r = c.post("/v1/experts/acme/survival/predict", headers=bearer(app["acme"]), json={"q": Q})
        assert r.status_code == 422
        r = c.post("/v1/chat/completions", headers=bearer(app["acme"]), json={
            "model": "acme/survival", "messages": [{"role": "system", "content": "no user message"}]})
        assert r.status_code == 400 and "last user message" in r.json()["error"]["message"]
        assert c.post("/v1/tenants/acme/connectors/x", headers=bearer(app["acme"]), json={"files": {}}).status_code == 403


def test_auto_can_choose_the_expert(app):
    with http() as c:
        r = c.post("/v1/chat/completions", headers=bearer(app["acme"]), json={
            "model": "auto", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Did the Titanic passenger survive? Age 30, paid 7.25 pounds, travelling alone."}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "acme/survival" and body["atelier"]["routing"]["chosen"] == "acme/survival"
    assert body["atelier"]["prediction"]["label"] in ("no", "yes")
    assert json.dumps(body["atelier"])  # the routing explanation is plain JSON


def test_connectors_for_another_base_model_are_refused(app, tmp_path):
    from llamdex.connectors_io import read_spec, save_connectors

    trained = app["trained"]
    foreign = read_spec(app["connectors_dir"]).model_copy(update={"base_model_id": "smollm2-135m",
                                                                  "base_model_hash": "f" * 64,
                                                                  "weights_sha256": None})
    save_connectors(trained.encoder, trained.decoder, foreign, tmp_path / "connectors")
    with http() as c:
        assert upload_dir(c, app["acme"], "acme", "experts", "foreign", app["expert_dir"]).status_code == 201
        assert upload_dir(c, app["admin"], "acme", "connectors", "foreign", tmp_path / "connectors").status_code == 201
        r = c.post("/v1/chat/completions", headers=bearer(app["acme"]), json={
            "model": "acme/foreign", "messages": [{"role": "user", "content": Q}]})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "trained for base model 'smollm2-135m'" in message and "fix:" in message
    assert predict(app["acme"], model="acme/foreign").status_code == 422
    # the replica checks too (a stale router, or a pool whose model the router cannot see)
    handle = serve.get_deployment_handle("pool-small", APP).options(multiplexed_model_id="acme/foreign@e1.c1")
    out = handle.predict.remote(PredictCall(expert="acme/foreign@e1.c1", question=Q)).result().error
    assert out.status == 422 and "base_model_hash" in out.message and "retrain" in out.message


def test_mixed_wave_base_adapter_expert(app):
    """Base, adapter and expert rows batched into one wave give the same answers as each alone."""
    client = oa(app["acme"])
    jobs = [("base", Q), ("acme/pirate", Q), ("acme/survival", Q), ("acme/survival", Q2), ("base", Q2),
            ("acme/pirate", Q2)]

    def ask(job) -> tuple[str, str | None]:
        r = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                           max_tokens=6, temperature=0)
        pred = (r.model_extra.get("atelier") or {}).get("prediction")
        return r.choices[0].message.content, pred and pred["label"]

    alone = [ask(job) for job in jobs]
    assert len({a for a, _ in alone[:3]}) == 3, "base, adapter and expert must differ for this test to bite"
    before = pool_stats()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    after = pool_stats()
    assert together == alone
    assert after["engine"]["rows_served"] - before["engine"]["rows_served"] == len(jobs)
    assert after["engine"]["batched_steps"] > before["engine"]["batched_steps"], "requests were not batched"


def test_concurrent_predictions_are_batched(app):
    before = pool_stats()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda q: predict(app["acme"], q).json(), [Q, Q2, Q, Q2]))
    assert results[0]["label"] == results[2]["label"] and results[0]["probabilities"] == pytest.approx(
        results[2]["probabilities"], abs=1e-5)
    assert max(r["atelier"]["batch_rows"] for r in results) > 1
    assert pool_stats()["predict_batches"] - before["predict_batches"] < 4


def test_cache_hits_and_misses_are_counted(app):
    before = pool_stats()
    assert predict(app["acme"]).status_code == 200
    after = pool_stats()
    assert after["expert_hits"] == before["expert_hits"] + 1 and after["expert_misses"] == before["expert_misses"]
    assert "acme/survival@e1.c1" in after["experts_resident"]

    def scrape() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        names = ("ray_atelier_expert_cache_hits_total", "ray_atelier_expert_cache_misses_total",
                 "ray_atelier_experts_resident")
        return text if all(n in text for n in names) and 'endpoint="predict"' in text else None

    # Ray's metrics agent exports on its own interval; on a 2-core box busy with other jobs it took over 45 s once
    wait_for(scrape, timeout_s=120, interval_s=2)


def test_new_expert_version_is_served_without_restart(app, tmp_path):
    """Re-publishing the expert (HTTP) or the connectors (a job writing to the registry) changes the
    key; the next requests use the new pair on the same replica, and none fails meanwhile."""
    from llamdex.expert import save_expert

    first, replica = predict(app["acme"]).json(), pool_stats()["replica"]
    expert = copy.deepcopy(app["trained"].expert)
    with torch.no_grad():  # an expert that is sure everyone survived
        expert.net.out.weight.zero_()
        expert.net.out.bias.fill_(12.0)
    save_expert(expert, app["trained"].expert_spec, tmp_path / "v2")
    errors, stop = [], concurrent.futures.Future()

    def load() -> None:
        while not stop.done():
            r = predict(app["acme"], Q2)
            if r.status_code != 200:
                errors.append(r.text)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(load) for _ in range(2)]
        with http() as c:
            r = upload_dir(c, app["acme"], "acme", "experts", "survival", tmp_path / "v2")
            assert r.status_code == 201 and r.json()["version"] == 2
        second = predict(app["acme"]).json()  # the very next request
        app["registry"].publish("acme", "connectors", "survival", {
            p.name: p.read_bytes() for p in app["connectors_dir"].iterdir()})
        third = wait_for(lambda: (b := predict(app["acme"]).json())["versions"]["connectors"] == 2 and b,
                         timeout_s=20)
        stop.set_result(True)
        for w in workers:
            w.result()
    assert not errors, errors[:2]
    assert second["versions"] == {"expert": 2, "connectors": 1, "key": "acme/survival@e2.c1"}
    assert first["expert_probabilities"]["yes"] < 0.99 < second["expert_probabilities"]["yes"]
    assert second["features"] == first["features"]  # same connectors: the encoder read the same
    assert third["versions"]["key"] == "acme/survival@e2.c2"
    assert pool_stats()["replica"] == replica  # same replica: no restart


def test_lru_evicts_and_frees_bundles(app):
    """max_experts_per_replica=2: three keys were used (e1.c1, e2.c1, e2.c2), the oldest was evicted
    and its weights are no longer referenced anywhere on the replica."""
    stats = pool_stats()
    assert len(stats["experts_resident"]) == 2 and "acme/survival@e1.c1" not in stats["experts_resident"]
    assert stats["expert_evictions"] >= 1 and stats["experts_alive"] == 2
    before = stats["expert_misses"]
    out = serve.get_deployment_handle("pool-small", APP).options(  # the old pair again: loaded again (a miss)
        multiplexed_model_id="acme/survival@e1.c1").predict.remote(
        PredictCall(expert="acme/survival@e1.c1", question=Q)).result().result
    assert out.expert_version == 1 and pool_stats()["expert_misses"] == before + 1


def test_job_published_expert_is_served_at_once(app):
    """Expert + connectors written straight into the registry (as the jobs do, no HTTP, no cache
    invalidation): a request soon after is served although the router's listing is still cached."""
    import time

    assert "acme/late" not in {m.id for m in oa(app["acme"]).models.list().data}  # listing cached now
    for kind, directory in (("expert", app["expert_dir"]), ("connectors", app["connectors_dir"])):
        app["registry"].publish("acme", kind, "late", {p.name: p.read_bytes() for p in directory.iterdir()})
    time.sleep(0.5)  # > catalog_miss_refresh_s (0.25 s), < catalog_ttl_s (2 s)
    r = predict(app["acme"], model="acme/late")
    assert r.status_code == 200, r.text
    assert r.json()["versions"]["key"] == "acme/late@e1.c1"


def test_artifact_listing_names_both_versions(app):
    with http() as c:
        listing = c.get("/v1/tenants/acme/artifacts", headers=bearer(app["acme"])).json()["data"]
    refs = {a["ref"] for a in listing}
    assert {"acme/expert/survival@2", "acme/connectors/survival@2"} <= refs


def test_the_ledger_on_the_api(app, tmp_path):
    """GET /v1/models, the artifact listing, predict and chat (plain and streamed) all carry the
    expert version and its DP ledger, read from the published expert.json. globex gets a DP
    expert (trained here with the default secure RNG); acme's expert has no DP."""
    from llamdex.codec import FeatureCodec
    from llamdex.dp_training import default_delta, train_expert
    from llamdex.expert import ExpertArch, ExpertSpec, save_expert
    from llamdex.synthetic import make_synthetic

    rows, labels = make_synthetic(SCHEMA, n_rows=400, seed=1)
    x = FeatureCodec(SCHEMA).encode(rows)
    model, ledger = train_expert(x, labels, ExpertArch.from_schema(SCHEMA, hidden_sizes=(16,)), epsilon=2.0,
                                 delta=default_delta(len(x)), epochs=2, batch_size=32, lr=1e-2, max_grad_norm=1.0,
                                 accountant="rdp")
    save_expert(model, ExpertSpec.build(SCHEMA, model.arch, ledger), tmp_path / "dp")
    want = json.loads(json.dumps(ledger.public_view()))
    assert want["dp"] is True and want["secure_rng"] is True and want["delta"] == 1e-4
    with http() as c:
        assert c.post("/v1/tenants/globex/schemas/titanic", headers=bearer(app["globex"]), json=SCHEMA).status_code == 201
        assert upload_dir(c, app["globex"], "globex", "experts", "survival", tmp_path / "dp").status_code == 201
        assert upload_dir(c, app["admin"], "globex", "connectors", "survival", app["connectors_dir"]).status_code == 201
        listing = c.get("/v1/tenants/globex/artifacts", headers=bearer(app["globex"])).json()["data"]
        acme_listing = c.get("/v1/tenants/acme/artifacts", headers=bearer(app["acme"])).json()["data"]
    assert [a["privacy"] for a in listing if a["kind"] == "expert"] == [want]
    assert all("privacy" not in a for a in listing if a["kind"] != "expert")
    acme_version = app["registry"].resolve("acme", "expert", "survival").version
    acme_ledger = next(a["privacy"] for a in acme_listing if a["ref"] == f"acme/expert/survival@{acme_version}")
    assert acme_ledger["dp"] is False and acme_ledger["epsilon"] is None and acme_ledger["secure_rng"] is False

    card = wait_for(lambda: next((m for m in oa(app["globex"]).models.list().data if m.id == "globex/survival"),
                                 None), timeout_s=10).model_extra["atelier"]
    assert card["privacy"] == want and card["expert_version"] == 1
    assert {k: want[k] for k in ("epsilon", "delta", "accountant", "secure_rng", "dp")} == {
        "epsilon": ledger.epsilon, "delta": 1e-4, "accountant": "rdp", "secure_rng": True, "dp": True}
    acme_card = next(m for m in oa(app["acme"]).models.list().data if m.id == "acme/survival").model_extra["atelier"]
    assert acme_card["privacy"] == acme_ledger and acme_card["expert_version"] == acme_version

    r = predict(app["globex"], model="globex/survival")
    assert r.status_code == 200, r.text
    assert r.json()["versions"]["expert"] == 1 and r.json()["privacy"] == want
    assert predict(app["acme"]).json()["privacy"] == acme_ledger
    messages = [{"role": "user", "content": Q}]
    chat = oa(app["globex"]).chat.completions.create(model="globex/survival", messages=messages, max_tokens=2)
    info = chat.model_extra["atelier"]
    assert info["expert_version"] == 1 and info["privacy"] == want and info["expert_key"] == "globex/survival@e1.c1"
    first = list(oa(app["globex"]).chat.completions.create(model="globex/survival", messages=messages,
                                                           max_tokens=2, stream=True))[0]
    assert first.model_extra["atelier"]["expert_version"] == 1 and first.model_extra["atelier"]["privacy"] == want
