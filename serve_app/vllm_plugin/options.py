"""Which plugin features an engine asks for, carried in vLLM's ``additional_config``.

vLLM loads general plugins into every process it starts, also plain vLLM runs that have nothing
to do with Atelier (e.g. the ``vllm-lora`` contender of bench/serving.py). Two gates keep the
plugin inert there:

1. the process gate: :func:`serve_app.vllm_plugin.register` installs nothing unless the
   environment variable ``ATELIER_VLLM_PLUGIN=1`` is set. Only :func:`.registration.engine_kwargs`
   (called by the Atelier vLLM pool) sets it, before the engine starts, so the engine-core and
   worker processes vLLM spawns inherit it;
2. the engine gate: the installed classes act only for an engine whose
   ``vllm_config.additional_config["atelier"]`` (a :class:`PluginOptions`) asks for the feature;
   a plain engine in the same process gets plain vLLM behaviour.

Only data and the gates live here (the plugin's layers and model read them inside vLLM); turning the
features on for an engine is :mod:`.registration`'s.
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


def process_enabled() -> bool:
    """Whether this process may install the plugin (the environment gate, see the module docstring)."""
    return os.environ.get(ENV_FLAG) == "1"


def current_options() -> PluginOptions:
    """The options of the engine being built in this process (inside vLLM's config context)."""
    from vllm.config import get_current_vllm_config

    return PluginOptions.from_vllm_config(get_current_vllm_config())
