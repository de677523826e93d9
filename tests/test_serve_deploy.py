"""`serve build` output deploys with `serve deploy` on a head started by `atelier up` (token auth on)."""

import os
import subprocess

import httpx
import pytest
import yaml

from cluster.registry import Registry
from tests.conftest import ROOT, VENV_BIN
from tests.serve_fixtures import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SERVE_PORT = 18500


def test_serve_build_then_deploy(tmp_path, tiny_model):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env.update(HOME=str(home), ATELIER_HOME=str(home / "atelier"), ATELIER_RAY_PORT="6591",
               ATELIER_DASHBOARD_PORT="8465", ATELIER_AGENT_PORT="52575", ATELIER_NUM_CPUS="2",
               ATELIER_OBJECT_STORE_MB="200", ATELIER_STORE=str(tmp_path / "store"))
    _, key = Registry(str(tmp_path / "store")).create_tenant("acme")
    pools = tmp_path / "pools.yaml"
    pools.write_text(yaml.safe_dump({"pools": [{"name": "default", "model": "tiny-random", "num_cpus": 0.5,
                                                "autoscaling": {"min_replicas": 1, "max_replicas": 1}}]}))
    out = tmp_path / "serve_config.yaml"
    build = subprocess.run([str(VENV_BIN / "serve"), "build", "serve_app.app:app", "-o", str(out)], cwd=ROOT,
                           env={**env, "ATELIER_SERVE_CONFIG": str(pools)}, capture_output=True, text=True,
                           timeout=180)
    assert build.returncode == 0, build.stderr
    config = yaml.safe_load(out.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": SERVE_PORT}
    app = config["applications"][0]
    assert app["import_path"] == "serve_app.app:app"
    assert {d["name"] for d in app["deployments"]} == {"Router", "pool-default"}
    pool_options = next(d for d in app["deployments"] if d["name"] == "pool-default")
    assert pool_options["ray_actor_options"]["num_cpus"] == 0.5
    # what an operator adds to the built file: the same pools file and store for the cluster's replicas
    app["runtime_env"] = {"env_vars": {"ATELIER_SERVE_CONFIG": str(pools), "ATELIER_STORE": str(tmp_path / "store")}}
    out.write_text(yaml.safe_dump(config))
    try:
        up = subprocess.run([str(VENV_BIN / "atelier"), "up"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        client_env = {**env, "RAY_AUTH_MODE": "token"}
        deploy = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(out), "-a", "http://127.0.0.1:8465"],
                                env=client_env, capture_output=True, text=True, timeout=180)
        assert deploy.returncode == 0, deploy.stderr

        def answered():
            try:
                r = httpx.post(f"http://127.0.0.1:{SERVE_PORT}/v1/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {key}"},
                               json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 3})
                return r if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        r = wait_for(answered, timeout_s=150, interval_s=2)
        assert r.json()["usage"]["completion_tokens"] <= 3
    finally:
        subprocess.run([str(VENV_BIN / "atelier"), "down"], env=env, capture_output=True, timeout=120)
