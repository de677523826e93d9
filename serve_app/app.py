"""Build the Serve application: ``Router`` (ingress) → one ``LLMReplica`` deployment per pool.

    serve run serve_app.app:build_app                      # defaults: one pool on smollm2-135m
    serve run serve_app.app:build_app config=pools.yaml    # pools from a file (see serve_app.config)
    serve build serve_app.app:build_app -o serve_config.yaml && serve deploy serve_config.yaml
    atelier serve [--config pools.yaml]
"""

from __future__ import annotations

from ray import serve

from cluster.settings import load_settings
from serve_app.config import AppConfig, load_app_config
from serve_app.ingress.router import Router
from serve_app.replica.deployment import pool_deployment


def build_from_config(config: AppConfig, store: str | None = None) -> serve.Application:
    """The bound application for ``config``."""
    store = store or config.store or load_settings().store_uri
    pools = {p.name: pool_deployment(p).bind(p.model_dump(), store) for p in config.pools}
    router = serve.deployment(Router).options(
        name="Router", num_replicas=config.router_replicas,
        ray_actor_options={"num_cpus": config.router_num_cpus}, max_ongoing_requests=256)
    return router.bind(config.model_dump(), store, pools)


def build_app(args: dict) -> serve.Application:
    """Serve's application builder: ``args`` may hold ``config`` (file path or JSON) and ``store``."""
    return build_from_config(load_app_config(args.get("config")), args.get("store"))


def _default_app() -> serve.Application:
    """Module-level application for ``serve build serve_app.app:app`` / config files.

    Reads the pools file from ``ATELIER_SERVE_CONFIG`` (defaults: one pool on the embedded
    model). Set the same variable on the cluster, e.g. in the built YAML's
    ``runtime_env.env_vars``, so replicas rebuild the same pools.
    """
    import os

    return build_from_config(load_app_config(os.environ.get("ATELIER_SERVE_CONFIG")),
                             os.environ.get("ATELIER_STORE") or None)


app = _default_app()
