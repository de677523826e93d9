"""Atelier's vLLM plugin: the compressed LoRA bank and Llamdex experts inside vLLM.

vLLM imports ``register`` in every process it starts (main, engine core, workers) through the
entry point ``[project.entry-points."vllm.general_plugins"] atelier`` in pyproject.toml. It is
inert unless the Atelier vLLM pool asks for it (see :mod:`.options`): it installs nothing in a
process without ``ATELIER_VLLM_PLUGIN=1`` (set only by :func:`engine_kwargs`), and even
where installed, only an engine created with
``additional_config={"atelier": {"bank": true, "experts": true}}`` gets

* bank LoRA layers (:mod:`.bank_layers`): every linear LoRA module holds its cluster bases
  U_c, V_c once and only (basis id, Σ_i) per adapter slot; adapters travel as tiny Σ-only PEFT
  files (:mod:`.bank_payload`) written by :class:`.bank_host.BankHost`;
* the Llamdex model (:mod:`.llamdex_model`): a Llama whose layer-k input at an expert request's
  slot positions is ``decoder(expert(encoder(h_k[prompt])))``, computed inside vLLM's forward.

The plugin is written against one vLLM version (:mod:`.compat`) and refuses any other.
This module stays import-light: the engine side imports option classes without vLLM.
"""

from serve_app.vllm_plugin.compat import SUPPORTED_VLLM_VERSIONS, VLLMVersionError, check_vllm_version
from serve_app.vllm_plugin.options import ENV_FLAG, PLUGIN_KEY, PluginOptions, process_enabled
from serve_app.vllm_plugin.registration import engine_kwargs, register_all

__all__ = ["ENV_FLAG", "PLUGIN_KEY", "SUPPORTED_VLLM_VERSIONS", "PluginOptions", "VLLMVersionError", "check_vllm_version",
           "engine_kwargs", "register"]


def register() -> None:
    """vLLM general-plugin entry point: install the bank LoRA layers and the Llamdex model.

    Does nothing in a process without ``ATELIER_VLLM_PLUGIN=1`` (plain vLLM runs stay plain).
    On an unsupported vLLM version nothing is installed and an error is logged (plain vLLM use in
    the same environment keeps working); an engine that asks for the plugin's features is then
    refused with :class:`VLLMVersionError` by :func:`engine_kwargs`
    and by the worker extension.
    """
    if not process_enabled():
        return
    register_all()
