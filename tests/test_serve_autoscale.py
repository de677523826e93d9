"""A pool scales up under load and back down when it ends (real Serve autoscaling)."""

import concurrent.futures
import time

import openai
import pytest
from ray import serve

from cluster.registry import Registry
from tests.serve_fixtures import BASE_URL, PORT, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def running_replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_pool_scales_up_and_down(ray_session, tiny_model, tmp_path):
    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    registry = Registry(str(tmp_path / "store"))
    _, key = registry.create_tenant("acme")
    config = load_app_config({"pools": [{
        "name": "elastic", "model": "tiny-random", "num_cpus": 0.5, "max_batch_size": 1, "max_ongoing_requests": 2,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2}}],
        "router_num_cpus": 0.1})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_from_config(config, str(tmp_path / "store")), name="scaling", route_prefix="/scaling")
    client = openai.OpenAI(base_url=f"{BASE_URL}/scaling/v1", api_key=key, max_retries=0, timeout=120)
    assert running_replicas("scaling", "pool-elastic") == 1
    stop_at = time.monotonic() + 120
    peak = 1

    def hammer() -> int:
        n = 0
        while time.monotonic() < stop_at and running_replicas("scaling", "pool-elastic") < 2:
            client.completions.create(model="base", prompt="Count:", max_tokens=48, temperature=0)
            n += 1
        return n

    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            done = [pool.submit(hammer) for _ in range(6)]
            peak = wait_for(lambda: running_replicas("scaling", "pool-elastic") >= 2 and 2, timeout_s=120)
            assert sum(f.result() for f in done) > 0
        assert peak == 2
        wait_for(lambda: running_replicas("scaling", "pool-elastic") == 1, timeout_s=60)
    finally:
        serve.delete("scaling")
