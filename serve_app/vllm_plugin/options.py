"""Which plugin features an engine asks for, carried in vLLM's ``additional_config``.

vLLM loads general plugins into every process it starts, also plain vLLM runs that have nothing
to do with Atelier (e.g. the ``vllm-lora`` contender of bench/serving.py). Two gates keep the
plugin inert there:

1. the process gate: :func:`serve_app.vllm_plugin.register` installs nothing unless the
   environment variable ``ATELIER_VLLM_PLUGIN=1`` is set. Only :meth:`PluginOptions.engine_kwargs`
   (called by the Atelier vLLM pool) sets it, before the engine starts, so the engine-core and
   worker processes vLLM spawns inherit it;
2. the engine gate: the installed classes act only for an engine whose
   ``vllm_config.additional_config["atelier"]`` (a :class:`PluginOptions`) asks for the feature;
   a plain engine in the same process gets plain vLLM behaviour.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict

PLUGIN_KEY = "atelier"
ENV_FLAG = "ATELIER_VLLM_PLUGIN"
"""Environment variable that lets the plugin install itself in a process ("1" = on)."""
WORKER_EXTENSION = "serve_app.vllm_plugin.worker_ext.AtelierWorkerExtension"


class PluginOptions(BaseModel):
    """Features of the plugin one engine uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bank: bool = False
    """Bank LoRA layers: shared cluster bases per module, Σ_i per slot (LoRA payloads from BankHost)."""
    experts: bool = False
    """Llamdex experts: the model is served as the plugin's Llamdex architecture (multimodal slots)."""

    @property
    def enabled(self) -> bool:
        return self.bank or self.experts

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> PluginOptions:
        """The options an engine was created with (all off if it was not created for Atelier)."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        raw = extra.get(PLUGIN_KEY) if isinstance(extra, dict) else None
        return cls.model_validate(raw or {})

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's EngineArgs that turn these features on (after a version check)."""
        if not self.enabled:
            return {}
        from serve_app.vllm_plugin.compat import check_vllm_version

        check_vllm_version()
        enable_in_this_process()
        kwargs: dict[str, Any] = {"additional_config": {PLUGIN_KEY: self.model_dump()},
                                  "worker_extension_cls": WORKER_EXTENSION}
        if self.experts:
            from serve_app.vllm_plugin.llamdex_model import engine_kwargs_for_experts

            kwargs.update(engine_kwargs_for_experts())
        return kwargs


def process_enabled() -> bool:
    """Whether this process may install the plugin (the environment gate, see the module docstring)."""
    return os.environ.get(ENV_FLAG) == "1"


def enable_in_this_process() -> None:
    """Open the process gate here and in the processes vLLM spawns from now on, and install the
    plugin now (vLLM may have loaded its general plugins in this process already)."""
    os.environ[ENV_FLAG] = "1"
    from serve_app.vllm_plugin.registration import register_all

    register_all()


def current_options() -> PluginOptions:
    """The options of the engine being built in this process (inside vLLM's config context)."""
    from vllm.config import get_current_vllm_config

    return PluginOptions.from_vllm_config(get_current_vllm_config())
