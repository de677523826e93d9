"""The Σ-only LoRA payload: how one bank adapter travels through vLLM's LoRA machinery.

vLLM loads an adapter from a PEFT directory, keeps it in its host-memory LRU (``max_cpu_loras``)
and copies it into a device slot (``set_lora(slot, lora_a, lora_b)``) when a batch needs it. A
bank adapter is ΔW_i = U_c Σ_i V_cᵀ per module, with U_c, V_c shared by its cluster; the bank
layers hold the bases once (installed by basis id), so the payload carries only, per module:

* ``lora_A.weight`` = Σ_i: ``[r, r]`` (JD-Full) or ``[1, r]`` (JD-Diag, the diagonal);
* ``lora_B.weight`` = a header ``[1, 64]`` of 0/1 values: 32 magic bits, then the basis id in
  32 bits. 0 and 1 are exact in every LoRA dtype (fp32, fp16, bf16), and the PEFT scaling is
  α/r = 1, so vLLM's loader (which casts and multiplies B by the scaling) keeps it intact.

vLLM's loader does not check these shapes; ``adapter_config.json`` says r = the bank rank and
lora_alpha = r. A payload is ~r² numbers per module instead of r·(d_in + d_out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

HEADER_WIDTH = 64
_MAGIC = torch.tensor([(0x9E3779B9 >> i) & 1 for i in range(32)], dtype=torch.float32)
PAYLOAD_MARKER = "atelier_bank_payload"


def encode_header(basis_id: int) -> torch.Tensor:
    """[1, 64] 0/1 tensor: magic bits then ``basis_id`` (0 <= id < 2^31) in binary, least significant first."""
    if not 0 <= basis_id < 2**31:
        raise ValueError(f"basis_id {basis_id} out of range [0, 2^31)")
    bits = torch.tensor([(basis_id >> i) & 1 for i in range(32)], dtype=torch.float32)
    return torch.cat([_MAGIC, bits])[None]


def decode_header(t: torch.Tensor) -> int | None:
    """The basis id in a payload header, or None if ``t`` is not one (e.g. a dense LoRA B matrix)."""
    if t.dim() != 2 or tuple(t.shape) != (1, HEADER_WIDTH):
        return None
    row = t[0].detach().to("cpu", torch.float32)
    if not torch.equal(row[:32], _MAGIC):
        return None
    bits = row[32:].round().to(torch.int64)
    return int(sum(int(b) << i for i, b in enumerate(bits.tolist())))


def write_payload(directory: str | Path, sigmas: Mapping[str, torch.Tensor], basis_id: int, rank: int) -> Path:
    """Write the PEFT directory vLLM loads for one bank adapter (atomic: config last).

    ``sigmas``: module name (as in ``model.named_modules()``, e.g. ``model.layers.0.self_attn.q_proj``)
    -> Σ_i ``[r, r]`` or σ_i ``[r]``; ``basis_id``: the cluster basis the BankHost installed for it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = encode_header(basis_id)
    tensors: dict[str, torch.Tensor] = {}
    for module, sigma in sigmas.items():
        a = sigma.detach().to("cpu", torch.float32)
        a = a[None] if a.dim() == 1 else a
        if a.shape[-1] != rank or a.shape[0] not in (1, rank):
            raise ValueError(f"sigma for {module!r}: shape {tuple(sigma.shape)}, expected [{rank}, {rank}] or [{rank}]")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = header.clone()
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in sigmas})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": suffixes, "bias": "none",
              "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM", PAYLOAD_MARKER: {"basis_id": basis_id}}
    tmp = directory / f".adapter_model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / "adapter_model.safetensors")
    tmp = directory / f".adapter_config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, directory / "adapter_config.json")
    return directory
