"""Inputs and contenders of ``bench/serving.py``: synthetic adapters, banks, prompts, engines.

Adapters are SYNTHETIC and labelled so: ``compression.synthetic_adapters.synthetic_collection`` with 4 planted
clusters, rank 8, on ``q_proj`` and ``v_proj`` of every layer (peft's default LoRA targets for
Llama), saved as ordinary PEFT directories; the first N of one collection of 1000 serve each N.
Content does not matter for speed (outputs have fixed lengths: ``ignore_eos``); layout does, and
this is the common one. Banks are JD-Full rank 16 with min(4, N) clusters (``compress_collection``,
the compression bench's smallest config that kept 95 % of trained adapters' accuracy), cached
on disk like the adapters.

Every contender is built behind the same :class:`serve_app.replica.engine_api.Engine` protocol and driven
the same way (in-process async clients): see :func:`build`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government number "
         "night point home water room mother area money story fact month lot right study book eye job word "
         "business issue side kind head house service friend father power hour game line end member law car "
         "city community name president team minute idea kid body information back parent face others level "
         "office door health person art war history party result change morning reason research girl guy "
         "moment air teacher force education").split()
RANK, CLUSTERS, BANK_RANK = 8, 4, 16
TARGETS = ("q_proj", "v_proj")
CONTENDERS = ("torch-base", "vllm-base", "hf-cb-base", "torch-bank", "vllm-pool", "vllm-bank", "vllm-lora",
              "vllm-lora-all",
              "peft", "torch-static-bank")


def adapter_dirs(root: Path, model_dir: Path, n: int) -> list[tuple[str, Path]]:
    """The first ``n`` synthetic adapters as PEFT directories (written once under ``root``)."""
    from compression import save_peft_adapter
    from compression.synthetic_adapters import synthetic_collection

    out = root / "adapters"
    names = [(f"bench/s{i:04d}", out / f"s{i:04d}") for i in range(n)]
    if all((p / "adapter_config.json").exists() for _, p in names):
        return names
    shapes = _target_shapes(model_dir)
    collection = synthetic_collection(1000, shapes, clusters=CLUSTERS, r0=RANK, seed=0, base_model="smollm2-135m")
    for (_, path), adapter in zip(names, collection.adapters, strict=False):
        if not (path / "adapter_config.json").exists():
            factors = {m: (0.02 * B, A) for m, (B, A) in adapter.factors.items()}  # a modest ΔW next to W
            save_peft_adapter(factors, path)
    return names


def _target_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    cfg = json.loads((model_dir / "config.json").read_text())
    d, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = d // heads
    shapes = {}
    for layer in range(cfg["num_hidden_layers"]):
        shapes[f"model.layers.{layer}.self_attn.{TARGETS[0]}"] = (d, d)
        shapes[f"model.layers.{layer}.self_attn.{TARGETS[1]}"] = (kv * head_dim, d)
    return shapes


def bank_dir(root: Path, model, n: int, log=print) -> Path:
    """The bank of the first ``n`` adapters (compressed once, cached under ``root``)."""
    from compression import compress_collection, load_peft_adapter, save_bank

    path = root / f"bank-{n}"
    if (path / "bank.json").exists():
        return path
    adapters = [load_peft_adapter(p, name=name) for name, p in adapter_dirs(root, model.path, n)]
    started = time.perf_counter()
    bank = compress_collection(adapters, rank=BANK_RANK, clusters=min(CLUSTERS, n), method="full",
                               base_model=model.id, base_model_hash=model.content_hash)
    save_bank(bank, path)
    log(f"[bench.serving] bank of {n} adapters compressed in {time.perf_counter() - started:.1f} s")
    return path


@dataclass(frozen=True)
class Workload:
    """Requests of one measurement: prompt text, output length, adapter (None = base), tenant."""

    prompts: list[str]
    max_tokens: list[int]
    adapters: list[str | None]


def workload(requests: int, prompt_tokens: int | list[int], max_tokens: int | list[int],
             adapters: list[str] | None, seed: int = 0) -> Workload:
    """``requests`` distinct prompts of about ``prompt_tokens`` words (no shared prefix for a prefix
    cache to exploit), each naming a uniformly random adapter (same sequence for every contender)."""
    rng = random.Random(seed)
    lengths = prompt_tokens if isinstance(prompt_tokens, list) else [prompt_tokens] * requests
    outs = max_tokens if isinstance(max_tokens, list) else [max_tokens] * requests
    prompts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
    chosen = [rng.choice(adapters) if adapters else None for _ in range(requests)]
    return Workload(prompts, outs, chosen)


def build(contender: str, model, dtype: str, threads: int, max_rows: int, root: Path, n: int, log=print,
          vllm_cpus: str | None = None, used: set[str] | None = None):
    """The engine for ``contender`` with the first ``n`` adapters loaded or attached (vLLM contenders
    load theirs into vLLM's CPU cache in :func:`warm`; ``vllm_cpus``: the cores vLLM's threads are
    bound to, default the first ``threads``). ``used``: the adapters the workload names; the peft
    server loads only those (peft's load time grows with every adapter injected — 86 s for 100 —
    while its forward computes only the active adapter, so loading the rest changes no timing).
    Returns (engine, seconds spent on adapters)."""
    from cluster.models import load_model

    torch.set_num_threads(threads)
    started = time.perf_counter()
    if contender in ("torch-base", "torch-bank"):
        from compression import load_bank
        from serve_app.replica.engine_torch import TorchEngine, TorchEngineConfig

        lm, tok = load_model(model, dtype)
        engine = TorchEngine(lm, tok, TorchEngineConfig(max_batch_rows=max_rows, threads=threads))
        started = time.perf_counter()
        if contender == "torch-bank":
            engine.set_bank(load_bank(bank_dir(root, model, n, log)), 1)
        return engine, time.perf_counter() - started
    if contender == "hf-cb-base":
        from bench.hf_continuous import HFContinuousBatching

        lm, tok = load_model(model, dtype)
        return HFContinuousBatching(lm, tok, max_rows=max_rows), 0.0
    if contender == "torch-static-bank":
        from bench.static_waves import StaticWaveEngine
        from compression import load_bank

        lm, tok = load_model(model, dtype)
        engine = StaticWaveEngine(lm, tok, max_batch_size=max_rows, batch_wait_ms=10, threads=threads)
        started = time.perf_counter()
        if n:
            engine.set_bank(load_bank(bank_dir(root, model, n, log)), 1)
        return engine, time.perf_counter() - started
    if contender == "peft":
        from peft import PeftModel

        from bench.peft_server import PeftServer

        lm, tok = load_model(model, dtype)
        started = time.perf_counter()
        dirs = [(name, path) for name, path in adapter_dirs(root, model.path, n) if used is None or name in used]
        peft_model = PeftModel.from_pretrained(lm, dirs[0][1], adapter_name=dirs[0][0])
        for name, path in dirs[1:]:
            peft_model.load_adapter(path, adapter_name=name)
        peft_model = peft_model.to(lm.dtype)
        return PeftServer(peft_model, tok, max_batch_size=max_rows, threads=threads), time.perf_counter() - started
    if contender.startswith("vllm"):
        from compression import load_bank
        from serve_app.replica.engine_vllm import PeftDirectories, VLLMEngine, VLLMOptions, vllm_lora_modules

        # LoRA sizing as vLLM documents it: max_loras = distinct adapters in one batch (every running
        # row may name a different one; one spare slot, see the CPU -1 note in serve_app.config),
        # max_cpu_loras = adapters cached in host memory (all of them: they fit), max_lora_rank =
        # the largest rank served (8 for the originals, the bank's 16 for exported bank adapters),
        # lora_target_modules = the modules the adapters touch (vLLM's tuning knob; default: all four).
        # vllm-bank: the same pool with the plugin's bank layers (bases once, Σ_i per adapter slot).
        rank = BANK_RANK if contender in ("vllm-pool", "vllm-bank") else RANK
        options = VLLMOptions(dtype=dtype, max_lora_rank=rank, max_loras=max_rows + 1,
                              max_cpu_loras=max(max_rows + 1, n), max_model_len=1024, max_num_seqs=max_rows,
                              cpu_threads_bind=vllm_cpus or f"0-{threads - 1}",
                              lora_target_modules=None if contender == "vllm-lora-all" else vllm_lora_modules(TARGETS),
                              bank_layers=contender == "vllm-bank", memory_probe=True)
        engine = VLLMEngine(model.path, root / f"vllm-exports-{n}", options)  # one export cache per bank
        started = time.perf_counter()
        if contender in ("vllm-pool", "vllm-bank") and n:
            engine.set_bank(load_bank(bank_dir(root, model, n, log)), 1)
        elif contender in ("vllm-lora", "vllm-lora-all") and n:
            engine.source = PeftDirectories(dict(adapter_dirs(root, model.path, n)))
        return engine, time.perf_counter() - started
    raise ValueError(f"contender {contender!r}: choose from {CONTENDERS}")


async def warm(engine, contender: str) -> float:
    """Inside the measuring event loop: vLLM contenders load every adapter into vLLM's CPU LoRA
    cache (``add_lora``), so all contenders start from a steady state. Returns the seconds spent."""
    started = time.perf_counter()
    if contender in ("vllm-pool", "vllm-bank", "vllm-lora", "vllm-lora-all") and engine.adapter_names():
        await engine.preload(engine.adapter_names())
    return time.perf_counter() - started
