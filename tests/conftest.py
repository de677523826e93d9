"""Shared fixtures. Every test session gets its own ATELIER_HOME; nothing touches ~/.cache/atelier
except the real-model tests, which reuse the converted SmolLM2 cache on purpose (a 42 s
conversion per session would dominate CI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
METRICS_PORT = 18080

# In-process Ray clusters in tests run without token auth (nothing written to ~/.ray);
# the local-cluster tests exercise token auth for real in a subprocess with their own HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def deep_validators() -> None:
    """The test session publishes artifacts like the app and the jobs do: with the science
    packages' deep validators installed (``cluster.validators``; nothing installs them at import)."""
    from cluster.validators import install_validators

    install_validators()


@pytest.fixture(scope="session")
def atelier_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("atelier-home")
    os.environ["ATELIER_HOME"] = str(home)
    os.environ.pop("ATELIER_STORE", None)
    return home


@pytest.fixture()
def settings(atelier_home):
    from cluster.settings import load_settings

    return load_settings()


@pytest.fixture()
def registry(tmp_path):
    from cluster.registry import Registry

    return Registry(str(tmp_path / "store"))


@pytest.fixture(scope="session")
def tiny_model(atelier_home):
    """The tiny-random base model, built once per session."""
    from cluster.models import resolve_model
    from cluster.settings import load_settings

    return resolve_model("tiny-random", load_settings())


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default, from the user's cache (pulled on first use: ~45 s, ~93 MB)."""
    from cluster.models import resolve_model
    from cluster.settings import load_settings

    home = Path(os.path.expanduser("~/.cache/atelier"))
    return resolve_model("smollm2-135m", load_settings(home=home))


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory, atelier_home):
    """One in-process Ray cluster for every test that needs Ray (2 CPUs, no dashboard UI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024, _metrics_export_port=METRICS_PORT,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()

