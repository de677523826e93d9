"""One typed settings object for every Atelier process, overridable from the environment.

Every field ``foo`` can be set with the environment variable ``ATELIER_FOO``; ``atelier
settings`` prints the effective values. Four process-level knobs are read where they act instead
(:data:`OTHER_ENV`); ``tests/test_settings.py`` checks that no other ``ATELIER_*`` variable is read
anywhere, so this file and that list are complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_home() -> Path:
    return Path(os.path.expanduser("~/.cache/atelier"))


OTHER_ENV = {
    "ATELIER_LOG_LEVEL": "cluster.logs: log level of every process (default INFO)",
    "ATELIER_SERVE_CONFIG": "serve_app.app: the pools file `serve run` / `serve build` deploy (default: one pool)",
    "ATELIER_MAX_JSON_BODY_MB": "serve_app.ingress.body_limit: largest JSON request body",
    "ATELIER_REPLICA_RETRIES": "serve_app.ingress.retry: attempts when a replica is lost (default 4)",
    "ATELIER_VLLM_PLUGIN": ("serve_app.vllm_plugin: the plugin's process gate, set to 1 by the vLLM pool's engine "
                            "for itself and the processes vLLM spawns (internal, not a knob)"),
}
"""``ATELIER_*`` variables read outside :class:`Settings` (name -> where and what)."""


@dataclass(frozen=True)
class Settings:
    """Effective configuration. Build it with :func:`load_settings`, not directly."""

    home: Path = field(default_factory=_default_home)
    """Local cache root: converted models, local cluster state, default artifact store."""
    store: str = ""
    """Artifact store URI: a local path or ``file://``, ``s3://``, ``gs://`` (pyarrow.fs). Empty → ``<home>/store``."""
    default_model: str = "smollm2-135m"
    """Base model used when a command or request names none."""
    ray_port: int = 6390
    """GCS port of the local head started by ``atelier up`` (outside Ray's worker port range 10002–19999)."""
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    agent_port: int = 52375
    """HTTP port of the head's dashboard agent (job submission needs it; probed by ``atelier up``)."""
    serve_port: int = 8000
    num_cpus: int = 0
    """CPUs the local head advertises; 0 = all cores."""
    object_store_mb: int = 1000
    """Object store size of the local head (Ray's default of 30 % of RAM is too much on a laptop)."""
    auth: str = "token"
    """Ray token auth of the local head: ``token`` (Ray 2.60's default) or ``disabled``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(os.path.expanduser(str(self.home))))

    @property
    def store_uri(self) -> str:
        """The artifact store URI with the default applied."""
        return self.store or str(self.home / "store")

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard_host}:{self.dashboard_port}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def cluster_dir(self) -> Path:
        return self.home / "cluster"


def load_settings(**overrides: object) -> Settings:
    """Defaults, then ``ATELIER_*`` environment variables, then explicit keyword overrides."""
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = os.environ.get(f"ATELIER_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        values[f.name] = _coerce(f.name, f.type, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.auth not in ("token", "disabled"):
        raise ValueError(f"ATELIER_AUTH must be 'token' or 'disabled', got {settings.auth!r}")
    return settings


def _coerce(name: str, type_name: object, raw: str) -> object:
    type_text = str(type_name)
    if "int" in type_text:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"ATELIER_{name.upper()} must be an integer, got {raw!r}") from None
    if "Path" in type_text:
        return Path(os.path.expanduser(raw))
    return raw


def describe_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """(env var, effective value, help) rows for ``atelier settings`` and the README."""
    rows = []
    for f in fields(Settings):
        doc = _FIELD_DOCS.get(f.name, "")
        rows.append((f"ATELIER_{f.name.upper()}", str(getattr(settings, f.name)), doc))
    return rows


_FIELD_DOCS = {
    "home": "cache root (models, local cluster state, default store)",
    "store": "artifact store URI; empty = <home>/store; s3://… or gs://… on a real cluster",
    "default_model": "base model when none is named (smollm2-135m | tiny-random | /path/to/hf-dir)",
    "ray_port": "GCS port of the local head",
    "dashboard_host": "dashboard bind address of the local head",
    "dashboard_port": "dashboard / job-submission port",
    "agent_port": "dashboard agent HTTP port of the local head",
    "serve_port": "Ray Serve HTTP port",
    "num_cpus": "CPUs of the local head (0 = all)",
    "object_store_mb": "object store size of the local head",
    "auth": "Ray token auth of the local head: token | disabled",
}
