"""Bank swaps under load, checked by answer: while four clients keep asking, the pool's bank is
swapped back and forth between two versions in which ``acme/pirate`` answers differently;
every greedy answer must equal its old-bank or its new-bank answer (computed independently with
peft on the bank's exported adapter), never anything else, and base answers never change."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
from ray import serve

from cluster.banks import model_linear_shapes, publish_bank, read_bank
from cluster.registry import Registry
from tests.serve_fixtures import BASE_URL, PORT, greedy_with_peft, make_peft_adapter, upload_dir

pytestmark = pytest.mark.ray
APP = "bankswap"
MSGS = [{"role": "user", "content": "Tell me about pirates and ships."}]
TOKENS = 8


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    import httpx

    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    work = tmp_path_factory.mktemp("bankswap")
    registry = Registry(str(work / "store"))
    _, key = registry.create_tenant("acme")
    config = load_app_config({"pools": [{
        "name": "small", "model": "tiny-random", "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_ms": 5,
        "max_new_tokens": 32, "bank_poll_s": 3600,  # only the test's broadcasts swap banks
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}], "rate_limit_rpm": 1_000_000})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(work / "store")), name=APP, route_prefix="/")
    with httpx.Client(base_url=BASE_URL, timeout=120) as c:
        for name, seed in (("pirate", 11), ("weather", 12), ("cooking", 13)):
            r = upload_dir(c, key, "acme", "adapters", name, make_peft_adapter(tiny_model.path, work / name, seed))
            assert r.status_code == 201, r.text
    yield {"registry": registry, "key": key, "model": tiny_model, "work": work}
    serve.delete(APP)


def test_every_answer_during_swaps_is_the_old_or_the_new_banks(app, tmp_path, capsys):
    import httpx

    from cluster.banks import load_registry_adapter
    from compression import compress_collection, export_adapter

    registry, model = app["registry"], app["model"]
    adapters = [load_registry_adapter(registry, "acme", n, model) for n in ("pirate", "weather", "cooking")]
    shapes = model_linear_shapes(str(model.path))
    old_bank, old_version = read_bank(registry, "small")  # exact: adapters projected one by one
    lossy = compress_collection(adapters, rank=1, clusters=1, method="full", base_shapes=shapes,
                                base_model=model.id, base_model_hash=model.content_hash)
    new_version = publish_bank(registry, "small", lossy, {"note": "bank swap test"})
    refs = {}
    for label, bank in (("old", old_bank), ("new", lossy)):
        refs[label] = greedy_with_peft(model.path, export_adapter(bank, "acme/pirate", tmp_path / label), MSGS, TOKENS)
    base_ref = greedy_with_peft(model.path, None, MSGS, TOKENS)
    assert refs["old"] != refs["new"], "the two banks must answer differently for the test to mean anything"

    handle = serve.get_deployment_handle("pool-small", APP)
    stop = threading.Event()
    answers: dict[str, list[str]] = {"acme/pirate": [], "base": []}
    errors: list[str] = []

    def client(model_id: str) -> None:
        with httpx.Client(base_url=BASE_URL, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {app['key']}"},
                           json={"model": model_id, "messages": MSGS, "max_tokens": TOKENS, "temperature": 0})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                else:
                    answers[model_id].append(r.json()["choices"][0]["message"]["content"])

    swaps = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(client, m) for m in ("acme/pirate", "acme/pirate", "acme/pirate", "base")]
        time.sleep(1.0)
        for i in range(8):  # old -> new -> old -> ... while the clients keep asking
            version = new_version if i % 2 == 0 else old_version
            started = time.perf_counter()
            handle.broadcast("reload_bank", version).results()
            swaps.append(round(time.perf_counter() - started, 3))
            time.sleep(0.6)
        stop.set()
        for w in workers:
            w.result()
    got = answers["acme/pirate"]
    counts = {label: sum(a == ref for a in got) for label, ref in refs.items()}
    other = [a for a in got if a not in refs.values()]
    with capsys.disabled():
        print(f"\nbank swaps: {len(swaps)} (s each: {swaps}); pirate answers {len(got)}: {counts}, "
              f"other {len(other)}; base answers {len(answers['base'])}; errors {len(errors)}")
    assert not errors, errors[:3]
    assert not other, other[:3]
    assert counts["old"] > 0 and counts["new"] > 0, "requests must have run under both banks"
    assert answers["base"] and all(a == base_ref for a in answers["base"])
