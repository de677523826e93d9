"""Train one codebook LoRA adapter fast (split forward, shared prefixes) and write it as a PEFT directory.

The choices (rank 8, q/v/o_proj, top 6 layers, AdamW lr 5e-3, batch 4, early stop) and what they
cost were measured on SmolLM2-135M-Instruct; the numbers are in ``docs/compression.md``
("Training the codebook adapters").
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from causal_lm import end_of_turn_id, num_layers
from compression.codebook.forward import answer_token_id, last_logits, lower_states, split_backbone
from compression.codebook.tasks import OBJECTIVE, LoraTask, TrainConfig, evaluate_detailed


def lora_config(cfg: TrainConfig, total_layers: int):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(cfg.target_modules), layers_to_transform=cfg.layer_range(total_layers),
                      task_type="CAUSAL_LM")


def _batches(templates: Sequence[int], batch_size: int, rng: torch.Generator) -> Iterable[tuple[list[int], bool]]:
    """Endless shuffled minibatches drawn within one phrasing at a time (a batch then shares the
    phrasing's token prefix, which the shared-prefix forward runs once); batch order is shuffled.
    Yields (indices, ends_epoch)."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(templates):
        groups.setdefault(t, []).append(i)
    while True:
        batches = []
        for members in groups.values():
            perm = [members[j] for j in torch.randperm(len(members), generator=rng).tolist()]
            batches += [perm[b:b + batch_size] for b in range(0, len(perm), batch_size)]
        order = torch.randperm(len(batches), generator=rng).tolist()
        for n, k in enumerate(order):
            yield batches[k], n == len(order) - 1


def train_lora(model, tokenizer, task: LoraTask, cfg: TrainConfig | None = None,
               base_metrics: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Train one adapter for ``task`` on ``model`` (a plain causal LM, left unchanged afterwards).

    Returns ``(state_dict, adapter_config, metrics)``: the PEFT state dict (keys
    ``base_model.model....lora_A.weight``, as in ``adapter_model.safetensors``), the
    ``adapter_config.json`` content, and base/adapter accuracies, losses, steps and seconds.
    ``base_metrics`` skips re-evaluating the base model (it depends on the prompts only).
    """
    from peft import get_peft_model, get_peft_model_state_dict

    cfg = cfg or TrainConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    total = num_layers(model)
    layers = cfg.layer_range(total)
    split = layers[0] if (cfg.split_forward and split_backbone(model)[1] is not None) else None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    # base model: accuracy before training and (cached) lower-layer states of all prompts
    if split is not None:
        lower_states(model, tokenizer, task.eval, split, cfg.eval_batch_size, cfg.shared_prefix)
    t_base = time.perf_counter()
    if base_metrics is None:
        base_metrics = evaluate_detailed(model, tokenizer, task, cfg.bf16, cfg.eval_batch_size, cfg.split_forward,
                                         cfg.shared_prefix, split_at=split)
    t_base = time.perf_counter() - t_base

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 1_000_003 + task.task_id)
        peft_model = get_peft_model(model, lora_config(cfg, total), adapter_name="default")
    rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + task.task_id)
    train_states = lower_states(model, tokenizer, task.train, split, cfg.eval_batch_size, cfg.shared_prefix) \
        if split is not None else None
    eot = end_of_turn_id(tokenizer)
    gold = torch.tensor([[answer_token_id(tokenizer, ex.answer), eot] for ex in task.train])  # [N, 2]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    b_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n]
    a_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" not in n]
    opt = torch.optim.AdamW([{"params": a_params, "lr": cfg.lr}, {"params": b_params, "lr": cfg.lr * cfg.lr_b_ratio}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * (0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    peft_model.train()
    losses: list[float] = []
    epoch_losses: list[float] = []
    epoch_loss, epoch_correct, epoch_n = 0.0, 0, 0
    first_loss, steps, stopped_early = None, 0, False
    t_train = time.perf_counter()
    try:
        for idx, ends_epoch in _batches([ex.template for ex in task.train], cfg.batch_size, rng):
            exs = [task.train[i] for i in idx]
            st = [train_states[i] for i in idx] if train_states is not None else None
            logits = last_logits(peft_model, tokenizer, exs, split, cfg.bf16, st, cfg.shared_prefix)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), gold[idx].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            sched.step()
            steps += 1
            losses.append(float(loss.detach()))
            first_loss = losses[0] if first_loss is None else first_loss
            epoch_loss += float(loss.detach()) * len(exs)
            epoch_correct += int((logits.argmax(-1) == gold[idx]).all(-1).sum())
            epoch_n += len(exs)
            if ends_epoch:
                epoch_losses.append(round(epoch_loss / epoch_n, 4))
                if epoch_correct == epoch_n and epoch_loss / epoch_n < cfg.stop_loss:
                    stopped_early = True
                    break
                epoch_loss, epoch_correct, epoch_n = 0.0, 0, 0
            if steps >= cfg.steps:
                break
        t_train = time.perf_counter() - t_train
        peft_model.eval()
        t_eval = time.perf_counter()
        metrics = evaluate_detailed(peft_model, tokenizer, task, cfg.bf16, cfg.eval_batch_size,
                                    cfg.split_forward, cfg.shared_prefix)
        t_eval = time.perf_counter() - t_eval
        state = {k: v.detach().to(torch.float32).contiguous().clone()
                 for k, v in get_peft_model_state_dict(peft_model, adapter_name="default").items()}
        adapter_config = peft_model.peft_config["default"].to_dict()
    finally:
        peft_model.unload()  # restores the original modules: the base model is reusable
        for p in model.parameters():
            p.requires_grad_(False)
    adapter_config = _jsonable(adapter_config)
    adapter_config["base_model_name_or_path"] = None
    adapter_config["inference_mode"] = True
    out = {
        "task_id": task.task_id, "family": task.family,
        **{f"base_{k}": v for k, v in base_metrics.items() if k != "chance"}, **metrics,
        "loss_first": round(first_loss or float("nan"), 4), "loss_last": round(losses[-1] if losses else float("nan"), 4),
        "epoch_losses": epoch_losses, "steps": steps, "stopped_early": stopped_early, "train_examples": len(task.train),
        "trainable_params": sum(v.numel() for v in state.values()),
        "seconds_base_eval": round(t_base, 2), "seconds_train": round(t_train, 2), "seconds_eval": round(t_eval, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        "cpu_seconds_total": round(time.process_time() - c0, 2),
        "config": cfg.model_dump(), "objective": OBJECTIVE,
    }
    return state, adapter_config, out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(obj) if isinstance(obj, set) else obj)]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


# ---------------------------------------------------------------------------------------- files
def adapter_files(state: dict[str, torch.Tensor], adapter_config: dict) -> dict[str, bytes]:
    """The standard PEFT directory content (safetensors only) as {file name: bytes}."""
    from safetensors.torch import save

    return {"adapter_config.json": json.dumps(adapter_config, indent=2, sort_keys=True).encode(),
            "adapter_model.safetensors": save(state, metadata={"format": "pt"})}


def write_adapter_dir(out_dir: Path, state: dict[str, torch.Tensor], adapter_config: dict,
                      extra: dict[str, bytes] | None = None) -> Path:
    """Write a PEFT adapter directory atomically (temp dir, then rename)."""
    import shutil
    import uuid

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, data in {**adapter_files(state, adapter_config), **(extra or {})}.items():
            (tmp / fname).write_bytes(data)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
