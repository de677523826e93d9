"""The plugin's entry point is loaded into every vLLM process; it must change nothing there unless
the Atelier vLLM pool asked for it (ATELIER_VLLM_PLUGIN=1, set by serve_app.vllm_plugin.engine_kwargs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.vllm_plugin.conftest import REPO

pytestmark = [pytest.mark.slow]

PROBE = """
import json, os
report = {}
if os.environ.get("PROBE_WORKER_EXT"):  # what a plugin engine's workers import before building the model
    import serve_app.vllm_plugin.worker_ext
    import vllm.lora.utils
    report["worker_ext_installs"] = vllm.lora.utils._all_lora_classes[0].__module__
from vllm.plugins import load_general_plugins
load_general_plugins()  # what every vLLM process does: loads serve_app.vllm_plugin:register
import vllm.lora.utils as lora_utils
from vllm import ModelRegistry
report.update(first_lora_class=lora_utils._all_lora_classes[0].__module__,
              llamdex_arch="AtelierLlamdexForCausalLM" in ModelRegistry.get_supported_archs())
if os.environ.get("PROBE_ENGINE_KWARGS"):
    from serve_app.vllm_plugin import PluginOptions, engine_kwargs
    report["kwargs"] = sorted(engine_kwargs(PluginOptions(bank=True)))
    report["env"] = os.environ.get("ATELIER_VLLM_PLUGIN")
    report["first_lora_class_after"] = lora_utils._all_lora_classes[0].__module__
print("PROBE" + json.dumps(report))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "ATELIER_VLLM_PLUGIN"} | env
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("PROBE"))[5:])


def test_entry_point_is_inert_in_plain_vllm_processes(plugin_entry_point_installed):
    pool = _probe(PROBE_ENGINE_KWARGS="1")
    # a plain process: the entry point ran and left vLLM's own LoRA layers first, no Llamdex model
    assert pool["first_lora_class"].startswith("vllm."), pool
    assert not pool["llamdex_arch"]
    # the pool's engine_kwargs opens the gate (for itself and the processes vLLM spawns) and installs
    assert pool["env"] == "1" and "additional_config" in pool["kwargs"]
    assert pool["first_lora_class_after"] == "serve_app.vllm_plugin.bank_layers"
    # with the gate open (a process spawned by the pool's engine), the entry point installs it
    spawned = _probe(ATELIER_VLLM_PLUGIN="1", PROBE_WORKER_EXT="1")
    assert spawned["worker_ext_installs"] == "serve_app.vllm_plugin.bank_layers"  # also without the entry point
    assert spawned["first_lora_class"] == "serve_app.vllm_plugin.bank_layers" and spawned["llamdex_arch"]
