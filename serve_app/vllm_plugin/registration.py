"""What ``serve_app.vllm_plugin.register`` installs into vLLM (called once per process by vLLM)."""

from __future__ import annotations

import logging

from serve_app.vllm_plugin.compat import version_problem

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
