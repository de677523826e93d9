"""What ``serve_app.vllm_plugin.register`` installs into vLLM (called once per process by vLLM), and
the engine side's switch that turns it on for one engine (:func:`engine_kwargs`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from serve_app.vllm_plugin.compat import check_vllm_version, version_problem
from serve_app.vllm_plugin.options import ENV_FLAG, PLUGIN_KEY, WORKER_EXTENSION, PluginOptions

log = logging.getLogger("atelier.vllm_plugin")
_done = False


def register_all() -> None:
    """Install the bank LoRA layer classes and register the Llamdex model (idempotent).

    Refuses (installs nothing, logs why) on a vLLM version the plugin was not written against.
    """
    global _done
    if _done:
        return
    problem = version_problem()
    if problem is not None:
        log.error("atelier vLLM plugin not installed: %s", problem)
        return
    from serve_app.vllm_plugin.bank_layers import install_bank_layers
    from serve_app.vllm_plugin.llamdex_model import register_llamdex_model

    install_bank_layers()
    register_llamdex_model()
    _done = True


def engine_kwargs(options: PluginOptions) -> dict[str, Any]:
    """Keyword arguments for vLLM's EngineArgs that turn ``options``' features on for one engine (after a
    version check); opens the process gate and installs the plugin in this process (see :mod:`.options`)."""
    if not options.enabled:
        return {}
    check_vllm_version()
    enable_in_this_process()
    kwargs: dict[str, Any] = {"additional_config": {PLUGIN_KEY: options.model_dump()},
                              "worker_extension_cls": WORKER_EXTENSION}
    if options.experts:
        from serve_app.vllm_plugin.llamdex_model import engine_kwargs_for_experts

        kwargs.update(engine_kwargs_for_experts())
    return kwargs


def enable_in_this_process() -> None:
    """Open the process gate here and in the processes vLLM spawns from now on, and install the
    plugin now (vLLM may have loaded its general plugins in this process already)."""
    os.environ[ENV_FLAG] = "1"
    register_all()
