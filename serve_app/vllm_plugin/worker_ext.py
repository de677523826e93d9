"""Worker-side control of the plugin, called with vLLM's ``collective_rpc`` from the engine.

vLLM mixes this class into its Worker (``worker_extension_cls``), so every method runs in every
worker process (all tensor-parallel ranks) between engine steps. Methods take and return plain
data (paths, ints, dicts) so they work with in-process and multiprocess engines alike.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open

from serve_app.vllm_plugin import register
from serve_app.vllm_plugin.compat import check_vllm_version

# vLLM imports this module in every worker of a plugin engine before it builds the model: install the
# plugin here too (a no-op without ATELIER_VLLM_PLUGIN=1, idempotent), so workers get it even in a venv
# whose installed metadata predates the entry point.
register()


class AtelierWorkerExtension:
    """Methods added to vLLM's Worker (all prefixed ``atelier_``)."""

    # ---------------------------------------------------------------- bank
    def _atelier_bank_modules(self) -> dict[str, tuple[Any, int]]:
        """Bank module name (HF naming, as in the bank) -> (bank layer, slice index)."""
        from serve_app.vllm_plugin.bank_layers import BankLayerMixin

        cached = getattr(self, "_atelier_module_map", None)
        if cached is not None:
            return cached
        check_vllm_version()
        manager = self.model_runner.lora_manager._adapter_manager
        mapping: dict[str, tuple[Any, int]] = {}
        for name, layer in manager.modules.items():
            if isinstance(layer, BankLayerMixin):
                for s, sub in enumerate(manager.packed_modules.get(name, [name])):
                    mapping[sub] = (layer, s)
        if not mapping:
            raise RuntimeError("no Atelier bank layers in this vLLM model: the plugin did not load (is "
                               "'atelier' excluded by VLLM_PLUGINS, or the entry point not installed? "
                               "fix: pip install -e . so vllm.general_plugins lists serve_app.vllm_plugin)")
        self._atelier_module_map = mapping
        return mapping

    def _atelier_slot_tables(self):
        from serve_app.vllm_plugin.bank_math import slot_table

        layers = {id(layer): layer for layer, _ in self._atelier_bank_modules().values()}
        return {id(t): t for t in (slot_table(layer.punica_wrapper, layer.bank_max_loras, layer.device)
                                   for layer in layers.values())}.values()

    def atelier_bank_install(self, path: str) -> list[int]:
        """Install the bases in the safetensors file ``path`` (keys ``<basis id>/<module>/U|V``)."""
        modules = self._atelier_bank_modules()
        installed: set[int] = set()
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            unknown = sorted({k.split("/")[1] for k in keys} - set(modules))
            if unknown:
                raise ValueError(f"bank modules {unknown[:5]} are not LoRA modules of this vLLM model; was the bank "
                                 "built for another base model?")
            for key in keys:
                basis, module, which = key.split("/")
                if which != "U":
                    continue
                layer, s = modules[module]
                layer.install_basis(int(basis), s, f.get_tensor(key), f.get_tensor(f"{basis}/{module}/V"))
                installed.add(int(basis))
        for table in self._atelier_slot_tables():
            table.installed |= installed
            table.changed()
        return sorted(installed)

    def atelier_bank_drop(self, basis_ids: list[int]) -> None:
        """Forget bases no adapter of any live bank version uses any more."""
        layers = {id(layer): layer for layer, _ in self._atelier_bank_modules().values()}
        for layer in layers.values():
            for b in basis_ids:
                layer.drop_basis(b)
        for table in self._atelier_slot_tables():
            table.installed -= set(basis_ids)
            table.changed()

    def atelier_memory(self) -> dict[str, int]:
        """Bytes held for adapters on this worker: bank bases and Σ slots (bank layers), vLLM's dense LoRA
        slots (layers that are not bank layers, e.g. a plain engine's, or LoRA-wrapped embeddings) and its
        host-memory adapter cache (all registered LoRAs)."""
        manager = self.model_runner.lora_manager._adapter_manager
        out = {"bank_bases": 0, "bank_slots": 0, "lora_slots": 0, "lora_host_cache": 0, "registered_loras": 0}
        seen: set[int] = set()

        def nbytes(t: torch.Tensor) -> int:
            if t.data_ptr() in seen or t.stride() and 0 in t.stride():
                return 0
            seen.add(t.data_ptr())
            return t.numel() * t.element_size()

        from serve_app.vllm_plugin.bank_layers import BankLayerMixin

        for layer in manager.modules.values():
            if isinstance(layer, BankLayerMixin):
                for k, v in layer.bank_bytes().items():
                    out[f"bank_{k}"] += v
            else:
                for name in ("lora_a_stacked", "lora_b_stacked"):
                    value = getattr(layer, name, None)
                    for t in [value] if isinstance(value, torch.Tensor) else (value or ()):
                        if isinstance(t, torch.Tensor):
                            out["lora_slots"] += nbytes(t)
        for lora in manager.list_adapters().values():
            out["registered_loras"] += 1
            for weights in lora.loras.values():
                for t in (weights.lora_a, weights.lora_b):
                    for x in t if isinstance(t, list) else [t]:
                        if isinstance(x, torch.Tensor):
                            out["lora_host_cache"] += nbytes(x)
        return out

    # ---------------------------------------------------------------- Llamdex experts
    def _atelier_experts(self):
        model = self.model_runner.get_model()
        table = getattr(getattr(model, "model", None), "experts", None)
        if table is None:
            raise RuntimeError(f"this vLLM engine serves {type(model).__name__}, not the Llamdex model; fix: create it "
                               "with engine_kwargs(PluginOptions(experts=True)) (serve_app.vllm_plugin)")
        return table

    def atelier_expert_load(self, slot_id: int, expert_dir: str, connectors_dir: str, model_hash: str) -> dict:
        """Load a tenant expert + its connectors (checked against ``model_hash``) into slot ``slot_id``."""
        from llamdex.insertion import load_bundle

        table = self._atelier_experts()
        bundle = load_bundle(expert_dir, connectors_dir, model_hash)
        hidden = self.model_runner.get_model().config.hidden_size
        layers = self.model_runner.get_model().config.num_hidden_layers
        if bundle.spec.hidden_size != hidden or bundle.spec.num_layers != layers:
            raise ValueError(f"connectors built for d={bundle.spec.hidden_size}, {bundle.spec.num_layers} layers; "
                             f"this model has d={hidden}, {layers} layers")
        table.bundles[slot_id] = bundle
        return {"layer": bundle.spec.layer, "num_slots": bundle.spec.num_slots}

    def atelier_expert_unload(self, slot_ids: list[int]) -> None:
        table = self._atelier_experts()
        for s in slot_ids:
            table.bundles.pop(s, None)

    def atelier_expert_results(self, nonces: list[int]) -> dict[int, dict | None]:
        """What each request's encoder read: ``{"encoded_features", "stated"}`` (popped; None if never computed)."""
        return self._atelier_experts().pop(nonces)

    def atelier_status(self) -> dict[str, Any]:
        """What the plugin installed in this worker (for the engine's start-up check)."""
        from serve_app.vllm_plugin.bank_layers import BankLayerMixin

        model = self.model_runner.get_model()
        bank_layers = sum(isinstance(m, BankLayerMixin) for m in model.modules())
        return {"bank_layers": bank_layers, "model_class": type(model).__name__,
                "vllm_version": check_vllm_version()}
