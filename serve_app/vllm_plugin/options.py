"""Which plugin features an engine asks for, carried in vLLM's ``additional_config``.

vLLM loads general plugins into every process before it knows any engine's configuration, so
the plugin's classes are installed unconditionally and decide per engine from
``vllm_config.additional_config["atelier"]`` (a :class:`PluginOptions`) whether to act. An engine
without that key gets plain vLLM behaviour.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PLUGIN_KEY = "atelier"
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
        kwargs: dict[str, Any] = {"additional_config": {PLUGIN_KEY: self.model_dump()},
                                  "worker_extension_cls": WORKER_EXTENSION}
        if self.experts:
            from serve_app.vllm_plugin.llamdex_model import engine_kwargs_for_experts

            kwargs.update(engine_kwargs_for_experts())
        return kwargs


def current_options() -> PluginOptions:
    """The options of the engine being built in this process (inside vLLM's config context)."""
    from vllm.config import get_current_vllm_config

    return PluginOptions.from_vllm_config(get_current_vllm_config())
