"""Many small, measurable LoRA tasks for one base model, and a fast trainer/evaluator for them.

Task family ("tenant codebooks")
--------------------------------
Every task is one tenant's private codebook over a SHARED question space: a family fixes a pool
of keys (crate codenames, project names, ticket topics, service names), a set of question
phrasings and a small answer vocabulary of single-token words. A tenant picks ``num_keys`` keys
from the pool and maps each to an answer with a seeded, balanced random assignment, so

* the base model cannot know the answers (accuracy ≈ chance = 1 / len(vocabulary)),
* all adapters of a family read the same kind of input and write into the same answer
  vocabulary: they share structure, which is what joint compression with per-cluster bases
  exploits (families are the natural clusters), while the facts themselves are tenant-specific.

Phrasings are split: the first ``TRAIN_TEMPLATES`` of each family are used for training and for
the primary metric ("the tenant's questions"); the rest are paraphrases held out from training.

Objective and metric
--------------------
The training sequence is prompt + answer token; the loss is the cross-entropy of the answer token
at the last prompt position plus that of the end-of-turn token (``<|im_end|>``) after it, so the
adapter's greedy reply is exactly the answer word and then stops (training only the first token
gave adapters that answered "yellowyellowyellow..." under real generation).
``accuracy`` = exact match of the greedy reply: argmax over the FULL vocabulary is the answer
token at the first assistant position AND the end-of-turn token after it (teacher forcing, which
equals greedy decoding here since the answer is one token). Also reported: ``first_token_accuracy``
and ``choice_accuracy`` (argmax restricted to the family's answer vocabulary; chance =
1 / len(vocabulary), the number to compare base models with), each on trained phrasings and
``heldout_*`` paraphrases. :func:`generate_answers` does real greedy generation for spot checks.

Speed
-----
LoRA is applied to the top layers only (``layers_to_transform``). The layers below the first
adapted layer are frozen, so their hidden states for each training/eval sequence are computed once
per (base model, split layer, prompt + answer token) and cached in memory; each optimisation step
then runs only the adapted top layers on the cached states, and only the last two positions go
through the LM head. The split forward is exact (tested against the full forward) and is used for
Llama-style decoders (``model.model`` with ``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``);
other architectures fall back to the full forward. The cache assumes frozen base weights: call
:func:`clear_cache` after changing them.
Batches are drawn within one phrasing, and the batch's common token prefix (system turn + question
start) goes through the adapted layers once, its keys/values shared by every row (also exact).

Measured on SmolLM2-135M-Instruct, fp32, ``torch.set_num_threads(1)`` (CPU seconds of the process)
----------------------------------------------------------------------------------------------------
* Full forward of 32 prompts x 54 tokens: ~11 s. Lower-layer cache of 80 prompts (layers 0-25):
  5.6 s with the shared prefix vs 11.9 s without (paid per task: sequences include the answer).
* One step, top 6 layers, batch 4: 0.30 s (batch 8: 0.41 s, batch 16 top 8 layers: 0.74 s; without
  the shared prefix 2.1x slower; bf16 autocast gave no gain on this CPU). Eval of 60-80 prompts ~1.4 s.
* Sweeps (accuracy on trained phrasings / held-out paraphrases): top 4 layers fail on some families
  (29-63 % after 60 steps); v/o/down_proj and LoRA+ (B lr x4-16) were worse or unstable; q/k/v/o no
  better than q/v/o; lr 2e-2 unstable. Chosen: r=8, alpha=16, q/v/o_proj, top 6 layers (24-29),
  AdamW lr 5e-3, batch 4, early stop (all-correct epoch with loss < 0.05), <= 200 steps, 12 keys.
  Typical loss curve: ~log(8) plateau (answer vocabulary learnt, key routing not yet) for 3-5
  epochs, then a sharp drop.
* Production run (100 adapters, 2 Ray workers x 1 core, shared box): 25.3 min; per adapter 63-144
  steps (mean 82), 25.9 s CPU mean (18.4-45.2, including its lower-layer cache, base and adapter
  evaluation), 147,456 LoRA parameters; exact match 99.9 % mean (min 94.4 %) on trained
  phrasings, 82.5 % on held-out paraphrases; base model 0 % exact, 13.6 % restricted to the
  answer vocabulary (chance 12.5 %).
"""

from __future__ import annotations

import enum
import json
import math
import random
import re
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

OBJECTIVE = "codebook-v2: cross-entropy on the answer token and the end-of-turn token after it"
"""Recorded with every adapter (and part of the job's cache fingerprint): bump when training changes."""
TRAIN_TEMPLATES = 3
"""Phrasings [0, TRAIN_TEMPLATES) of every family are trained on; the rest are held out."""
ANSWER_SUFFIX = ""
"""Appended to every question. Empty: the adapter itself must answer with the bare word (shorter
prompts also make training cheaper)."""


# ---------------------------------------------------------------------------------------- families
class Family(BaseModel):
    """A shared question space: key pool, phrasings and answer vocabulary."""

    model_config = ConfigDict(frozen=True)
    name: str
    subject: str  # what a tenant's codebook records, used in descriptions
    key_noun: str
    answer_noun: str
    keys: tuple[str, ...]
    answers: tuple[str, ...]  # single-token words (no leading space) in the SmolLM2 tokenizer
    templates: tuple[str, ...]  # "{key}" is substituted; ANSWER_SUFFIX is appended


FAMILIES: tuple[Family, ...] = (
    Family(
        name="crate-colors", subject="the color label assigned to each storage crate",
        key_noun="crate codename", answer_noun="color",
        keys=("Falcon", "Harbor", "Maple", "Comet", "Juniper", "Onyx", "Pebble", "Quartz", "Raven",
              "Saffron", "Tundra", "Willow", "Atlas", "Birch", "Cobalt", "Dune", "Ember", "Fjord",
              "Glacier", "Hazel", "Iris", "Jasper", "Kestrel", "Lotus", "Meadow", "Nimbus", "Orchid",
              "Prairie", "Ridge", "Sable", "Thistle", "Vesper"),
        answers=("red", "blue", "green", "yellow", "purple", "orange", "black", "white"),
        templates=("What color is the {key} crate?",
                   "Which color label does crate {key} have?",
                   "Tell me the color of the {key} crate.",
                   "I need the color code for crate {key}. What is it?",
                   "Crate {key}: what color is it tagged with?"),
    ),
    Family(
        name="project-status", subject="the current status of each internal project",
        key_noun="project", answer_noun="status",
        keys=("Aurora", "Beacon", "Cascade", "Delta", "Echo", "Fusion", "Granite", "Horizon", "Ignite",
              "Jetstream", "Keystone", "Lighthouse", "Monarch", "Nova", "Orbit", "Pinnacle", "Quasar",
              "Radiant", "Summit", "Titan", "Unity", "Vanguard", "Wavelength", "Zenith", "Catalyst",
              "Evergreen", "Frontier", "Helix", "Mosaic", "Nexus", "Prism", "Sentinel"),
        answers=("active", "done", "review", "draft", "pending", "closed", "planned", "live"),
        templates=("What is the status of project {key}?",
                   "Which status does the {key} project have right now?",
                   "Tell me the current status of project {key}.",
                   "Where does project {key} stand at the moment?",
                   "Project {key}: what state is it in?"),
    ),
    Family(
        name="ticket-routing", subject="which team handles each kind of support ticket",
        key_noun="ticket topic", answer_noun="team",
        keys=("password reset", "refund request", "invoice copy", "data export", "account deletion",
              "API rate limits", "SSO setup", "contract renewal", "bug report", "feature request",
              "GDPR request", "billing address change", "seat upgrade", "outage report", "onboarding call",
              "tax exemption", "custom domain", "audit log access", "mobile app crash", "webhook failure",
              "trademark question", "partnership inquiry", "press inquiry", "security vulnerability",
              "plan downgrade", "payment failure", "usage report", "sandbox access", "training session",
              "translation request", "accessibility issue", "data retention"),
        answers=("security", "legal", "support", "design", "research", "platform", "operations",
                 "engineering"),
        templates=("Which team handles {key} tickets?",
                   "Who should a {key} ticket be routed to?",
                   "Tell me the team responsible for {key} tickets.",
                   "A customer opened a ticket about {key}. Which team takes it?",
                   "Ticket topic {key}: which team owns it?"),
    ),
    Family(
        name="service-owners", subject="which engineer owns each internal service",
        key_noun="service", answer_noun="owner",
        keys=("ledger", "gateway", "scheduler", "indexer", "notifier", "crawler", "billing-api", "auth",
              "search", "uploader", "metrics", "mailer", "router", "cache", "archiver", "exporter",
              "importer", "renderer", "tracker", "payments", "inventory", "reports", "chat", "profile",
              "catalog", "checkout", "recommender", "geocoder", "translator", "thumbnailer", "webhooks",
              "audit"),
        answers=("Alice", "Bob", "David", "Frank", "Henry", "Anna", "Maria", "James"),
        templates=("Who owns the {key} service?",
                   "Which engineer is the owner of the {key} service?",
                   "Tell me who is responsible for the {key} service.",
                   "If the {key} service breaks, whose service is it?",
                   "Service {key}: who is its owner?"),
    ),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------------------------------- tasks
class Example(BaseModel):
    """One question of a tenant: chat messages (user turn only) and the expected answer word."""

    model_config = ConfigDict(frozen=True)
    messages: list[dict[str, str]]
    answer: str
    key: str
    template: int
    heldout: bool = False  # phrasing not used in training


class LoraTask(BaseModel):
    """One tenant's codebook: what the adapter must learn and how it is evaluated."""

    model_config = ConfigDict(frozen=True)
    task_id: int
    seed: int
    tenant: str  # registry-compatible tenant id
    name: str  # artifact / adapter name
    family: str
    title: str
    description: str  # for an `auto` router matching prompts to adapters
    answer_vocab: list[str]
    facts: dict[str, str]
    train: list[Example]
    eval: list[Example] = Field(description="every key x every phrasing; `heldout` marks paraphrases")

    def prompts(self) -> list[str]:
        return [ex.messages[-1]["content"] for ex in self.eval]


def task_name(task_id: int) -> str:
    return f"codebook-{task_id:04d}"


def make_task(task_id: int, seed: int = 0, num_keys: int = 12) -> LoraTask:
    """The deterministic task ``task_id`` (family = task_id mod #families; facts from (seed, task_id))."""
    if task_id < 0:
        raise ValueError(f"task_id must be >= 0, got {task_id}")
    family = FAMILIES[task_id % len(FAMILIES)]
    if not len(family.answers) <= num_keys <= len(family.keys):
        raise ValueError(f"num_keys must be in [{len(family.answers)}, {len(family.keys)}], got {num_keys}")
    rng = random.Random(f"atelier-lora-task:{seed}:{task_id}")
    keys = rng.sample(list(family.keys), num_keys)
    # balanced: every answer is used floor/ceil(num_keys / |vocab|) times, so no constant answer wins
    answers = [family.answers[i % len(family.answers)] for i in range(num_keys)]
    rng.shuffle(answers)
    facts = dict(zip(keys, answers, strict=True))
    name = task_name(task_id)
    tenant = f"lora-t{task_id:04d}"
    examples = [
        Example(messages=[{"role": "user", "content": tpl.format(key=key) + ANSWER_SUFFIX}], answer=ans,
                key=key, template=ti, heldout=ti >= TRAIN_TEMPLATES)
        for ti, tpl in enumerate(family.templates) for key, ans in facts.items()
    ]
    train = [ex for ex in examples if not ex.heldout]
    title = f"Tenant {tenant}: {family.answer_noun} codebook ({family.name})"
    sample_q = family.templates[0].format(key=keys[0])
    description = (
        f"Internal codebook of tenant {tenant} recording {family.subject}. It answers questions such as "
        f"\"{sample_q}\" with one word, the {family.answer_noun} ({', '.join(family.answers)}). "
        f"Covered {family.key_noun}s: {', '.join(sorted(keys))}."
    )
    return LoraTask(task_id=task_id, seed=seed, tenant=tenant, name=name, family=family.name, title=title,
                    description=description, answer_vocab=list(family.answers), facts=facts, train=train,
                    eval=examples)


# ---------------------------------------------------------------------------------------- config
class TrainConfig(BaseModel):
    """LoRA settings. Defaults are the measured SmolLM2-135M choice (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = ["q_proj", "v_proj", "o_proj"]
    num_layers: int = 6
    """Adapt the top ``num_layers`` decoder layers (``layers_to_transform``)."""
    steps: int = 200
    """Maximum optimiser steps (cosine schedule length); training stops earlier once a full pass over
    the training questions is all correct with mean loss below ``stop_loss``."""
    stop_loss: float = 0.05
    lr: float = 5e-3
    batch_size: int = 4
    weight_decay: float = 0.0
    lr_b_ratio: float = 1.0
    """LoRA+: learning rate of the B factors = lr * lr_b_ratio."""
    clip_grad: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    warmup: int = 5
    seed: int = 0
    bf16: bool = False
    """bfloat16 autocast for the adapted layers (faster on CPUs with bf16 support)."""
    split_forward: bool = True
    """Cache the frozen lower layers' hidden states (exact; Llama-style decoders only)."""
    shared_prefix: bool = True
    """Run the prompts' common token prefix once per batch and share its keys/values (exact)."""
    eval_batch_size: int = 32

    def layer_range(self, total_layers: int) -> list[int]:
        n = max(1, min(self.num_layers, total_layers))
        return list(range(total_layers - n, total_layers))


# ---------------------------------------------------------------------------------------- model plumbing
def _base_lm(model):
    """The underlying *ForCausalLM of a plain or PEFT-wrapped model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _backbone(model):
    lm = _base_lm(model)
    bb = getattr(lm, "model", None)
    ok = (bb is not None and hasattr(lm, "lm_head") and all(hasattr(bb, a) for a in
          ("embed_tokens", "layers", "rotary_emb", "norm")))
    return (lm, bb) if ok else (lm, None)


def num_layers(model) -> int:
    return int(_base_lm(model).config.num_hidden_layers)


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def first_adapted_layer(model) -> int:
    """Lowest decoder layer holding LoRA weights or a compressed-bank layer (``compression.BankLinear``);
    ``num_layers`` when there are none. The split forward caches the states entering this layer."""
    from compression import BankLinear

    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    names += [n + "." for n, mod in model.named_modules() if isinstance(mod, BankLinear)]
    idx = [int(m.group(1)) for n in names if (m := _LAYER_RE.search(n))]
    return min(idx) if idx else num_layers(model)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _run_layers(bb, x: torch.Tensor, mask: torch.Tensor, layers: Sequence) -> torch.Tensor:
    """Run decoder ``layers`` on left-padded hidden states ``x`` [B, T, d] with 2-D ``mask``."""
    from transformers.masking_utils import create_causal_mask

    pos = _positions(mask)
    causal = create_causal_mask(config=bb.config, inputs_embeds=x, attention_mask=mask, past_key_values=None,
                                position_ids=pos)
    pe = bb.rotary_emb(x, pos)
    for layer in layers:
        x = layer(x, attention_mask=causal, position_embeddings=pe, position_ids=pos)
    return x


def _common_prefix(ids: Sequence[torch.Tensor]) -> int:
    """Length of the longest common token prefix, leaving every sequence at least two own tokens."""
    n = min(int(i.shape[0]) for i in ids) - 2
    if len(ids) < 2 or n <= 0:
        return 0
    stack = torch.stack([i[:n] for i in ids])
    same = (stack == stack[0]).all(0)
    return n if bool(same.all()) else int(same.long().argmin())


def _run_layers_shared_prefix(bb, prefix: torch.Tensor, suffix: torch.Tensor, smask: torch.Tensor,
                              layers: Sequence, first_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` on sequences that share ``prefix`` [1, P, d] and continue with left-padded
    ``suffix`` [B, S, d]: the prefix goes through once (batch 1) and its keys/values are reused by
    every row, which is exact (causal attention) and differentiable. Returns (prefix out, suffix out)."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    B, P = suffix.shape[0], prefix.shape[1]
    cache = DynamicCache(config=bb.config)
    pmask = torch.ones(1, P, dtype=torch.long)
    ppos = _positions(pmask)
    pcausal = create_causal_mask(config=bb.config, inputs_embeds=prefix, attention_mask=pmask,
                                 past_key_values=cache, position_ids=ppos, layer_idx=first_layer)
    pe = bb.rotary_emb(prefix, ppos)
    h = prefix
    for layer in layers:
        h = layer(h, attention_mask=pcausal, position_embeddings=pe, position_ids=ppos, past_key_values=cache,
                  use_cache=True)
    for cl in cache.layers:
        if getattr(cl, "is_initialized", False):
            cl.keys = cl.keys.expand(B, -1, -1, -1)
            cl.values = cl.values.expand(B, -1, -1, -1)
    full = torch.cat([torch.ones(B, P, dtype=torch.long), smask], 1)
    spos = P + _positions(smask)
    scausal = create_causal_mask(config=bb.config, inputs_embeds=suffix, attention_mask=full,
                                 past_key_values=cache, position_ids=spos, layer_idx=first_layer)
    pe = bb.rotary_emb(suffix, spos)
    x = suffix
    for layer in layers:
        x = layer(x, attention_mask=scausal, position_embeddings=pe, position_ids=spos, past_key_values=cache,
                  use_cache=True)
    return h, x


def _run_states(bb, states: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], start: int, end: int,
                shared_prefix: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run decoder layers [start, end) of ``bb`` on per-sequence input states [T_i, d].

    Returns (per-sequence outputs [T_i, d], outputs of the last two positions [B, 2, d]). Sequences sharing a
    common token prefix (the chat template's system turn, at least) take the shared-prefix path."""
    layers = bb.layers[start:end]
    P = _common_prefix(ids) if shared_prefix else 0
    if P >= 4:
        suffix, smask = _left_pad([s[P:] for s in states], 0.0)
        h, x = _run_layers_shared_prefix(bb, states[0][None, :P], suffix, smask, layers, start)
        S = suffix.shape[1]
        full = [torch.cat([h[0], x[j, S - (s.shape[0] - P):]]) for j, s in enumerate(states)]
        return full, x[:, -2:]
    x, mask = _left_pad(list(states), 0.0)
    x = _run_layers(bb, x, mask, layers)
    T = x.shape[1]
    return [x[j, T - s.shape[0]:] for j, s in enumerate(states)], x[:, -2:]


def _left_pad(seqs: Sequence[torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [T_i, ...] tensors left-padded to max T; returns (padded, attention mask)."""
    T = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), T, *seqs[0].shape[1:]), pad_value)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, T - s.shape[0]:] = s
        mask[i, T - s.shape[0]:] = 1
    return out, mask


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt up to the assistant's first token (the serving path's encoding)."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def answer_token_id(tokenizer, answer: str) -> int:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return ids[0]


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template emits right after an assistant reply (``<|im_end|>`` for ChatML)."""
    cached = getattr(tokenizer, "_atelier_eot_id", None)
    if cached is not None:
        return cached
    msgs = [{"role": "user", "content": "q"}]
    prompt = encode_prompt(tokenizer, msgs)
    reply = tokenizer.encode("x", add_special_tokens=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "x"}], tokenize=True,
                                         return_dict=True)["input_ids"]
    n = len(prompt) + len(reply)
    eot = int(full[n]) if list(full[:n]) == prompt + reply and len(full) > n else int(tokenizer.eos_token_id)
    try:
        tokenizer._atelier_eot_id = eot
    except AttributeError:
        pass
    return eot


class _PromptCache:
    """Per base model: encoded prompts and hidden states entering layer L (frozen part)."""

    def __init__(self) -> None:
        self.ids: dict[str, torch.Tensor] = {}
        self.states: dict[tuple[int, str], torch.Tensor] = {}


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_cache() -> None:
    """Forget cached prompt states (needed only if base weights were changed in place)."""
    _CACHES.clear()


def _cache_for(model) -> _PromptCache:
    lm = _base_lm(model)
    cache = _CACHES.get(lm)
    if cache is None:
        cache = _CACHES[lm] = _PromptCache()
    return cache


def _prompt_ids(model, tokenizer, examples: Sequence[Example]) -> list[torch.Tensor]:
    cache = _cache_for(model)
    out = []
    for ex in examples:
        text = ex.messages[-1]["content"] if len(ex.messages) == 1 else json.dumps(ex.messages)
        ids = cache.ids.get(text)
        if ids is None:
            ids = cache.ids[text] = torch.tensor(encode_prompt(tokenizer, ex.messages), dtype=torch.long)
        out.append(ids)
    return out


def _seq_ids(model, tokenizer, examples: Sequence[Example]) -> list[torch.Tensor]:
    """Prompt + answer token: position -2 predicts the answer, position -1 the end of turn."""
    return [torch.cat([i, torch.tensor([answer_token_id(tokenizer, ex.answer)])])
            for i, ex in zip(_prompt_ids(model, tokenizer, examples), examples, strict=True)]


@torch.no_grad()
def _lower_states(model, tokenizer, examples: Sequence[Example], split: int, batch_size: int,
                  shared_prefix: bool = True) -> list[torch.Tensor]:
    """Hidden states [T_i, d] entering layer ``split`` for each example's prompt + answer (cached)."""
    _, bb = _backbone(model)
    cache = _cache_for(model)
    ids = _seq_ids(model, tokenizer, examples)
    keys = [(split, tuple(i.tolist())) for i in ids]
    # sorted by token ids: a chunk shares its template's prefix, not only the system turn
    todo = sorted({k: i for k, i in zip(keys, ids, strict=True) if k not in cache.states}.items())
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        chunk_ids = [i for _, i in chunk]
        embeds = [bb.embed_tokens(i) for i in chunk_ids]
        outs = _run_states(bb, embeds, chunk_ids, 0, split, shared_prefix)[0] if split > 0 else embeds
        for (k, _), o in zip(chunk, outs, strict=True):
            cache.states[k] = o.detach().clone()
    return [cache.states[k] for k in keys]


def _last_logits(model, tokenizer, examples: Sequence[Example], split: int | None, bf16: bool,
                 states: Sequence[torch.Tensor] | None = None, shared_prefix: bool = True) -> torch.Tensor:
    """Logits [B, 2, V] of prompt + answer: [:, 0] at the last prompt position (predicts the
    answer token), [:, 1] at the answer token (predicts the end of turn; teacher forcing)."""
    lm, bb = _backbone(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if bb is None or split is None:
            ids, mask = _left_pad(_seq_ids(model, tokenizer, examples), 0)
            h = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=2).logits
            return h[:, -2:].float()
        ids = _seq_ids(model, tokenizer, examples)
        _, last = _run_states(bb, states, ids, split, len(bb.layers), shared_prefix)
        return lm.lm_head(bb.norm(last)).float()


# ---------------------------------------------------------------------------------------- evaluation
def _predict_logits(model, tokenizer, examples: Sequence[Example], bf16: bool = False, batch_size: int = 32,
                    split_forward: bool = True, shared_prefix: bool = True,
                    split_at: int | None = None) -> torch.Tensor:
    _, bb = _backbone(model)
    split = None
    if split_forward and bb is not None:
        split = first_adapted_layer(model) if split_at is None else min(split_at, first_adapted_layer(model))
    out = []
    with torch.no_grad():
        for b in range(0, len(examples), batch_size):
            chunk = examples[b:b + batch_size]
            states = _lower_states(model, tokenizer, chunk, split, batch_size, shared_prefix) \
                if split is not None else None
            out.append(_last_logits(model, tokenizer, chunk, split, bf16, states, shared_prefix))
    return torch.cat(out)


def eval_logits(model, tokenizer, task: LoraTask, bf16: bool = False, batch_size: int = 32,
                split_forward: bool = True, shared_prefix: bool = True, split_at: int | None = None) -> torch.Tensor:
    """Logits [len(task.eval), 2, vocab] that :func:`evaluate_detailed` scores: at the answer position and
    (teacher-forced) at the end-of-turn position. Same arguments as evaluate_detailed."""
    was_training = model.training
    model.eval()
    try:
        return _predict_logits(model, tokenizer, task.eval, bf16, batch_size, split_forward, shared_prefix,
                               split_at)
    finally:
        model.train(was_training)


def score_logits(logits: torch.Tensor, tokenizer, task: LoraTask) -> dict[str, float]:
    """The metrics of :func:`evaluate_detailed` from :func:`eval_logits` output."""
    gold = torch.tensor([answer_token_id(tokenizer, ex.answer) for ex in task.eval])
    vocab = torch.tensor([answer_token_id(tokenizer, a) for a in task.answer_vocab])
    first = logits[:, 0].argmax(-1) == gold
    exact = first & (logits[:, 1].argmax(-1) == end_of_turn_id(tokenizer))
    choice = vocab[logits[:, 0, vocab].argmax(-1)] == gold
    held = torch.tensor([ex.heldout for ex in task.eval])

    def mean(t: torch.Tensor, sel: torch.Tensor) -> float:
        return round(float(t[sel].float().mean()), 4) if bool(sel.any()) else float("nan")

    return {"accuracy": mean(exact, ~held), "heldout_accuracy": mean(exact, held),
            "first_token_accuracy": mean(first, ~held), "heldout_first_token_accuracy": mean(first, held),
            "choice_accuracy": mean(choice, ~held), "heldout_choice_accuracy": mean(choice, held),
            "chance": round(1.0 / len(task.answer_vocab), 4)}


def evaluate_detailed(model, tokenizer, task: LoraTask, bf16: bool = False, batch_size: int = 32,
                      split_forward: bool = True, shared_prefix: bool = True,
                      split_at: int | None = None) -> dict[str, float]:
    """Exact-match and choice accuracy on the trained phrasings and on the held-out paraphrases.

    ``split_at`` caps the layer whose input states are cached (default: the first adapted layer;
    for a plain model that is the whole model, which is right for repeated base evaluations)."""
    logits = eval_logits(model, tokenizer, task, bf16, batch_size, split_forward, shared_prefix, split_at)
    return score_logits(logits, tokenizer, task)


def evaluate(model, tokenizer, task: LoraTask, heldout: bool = False, **kwargs) -> float:
    """Exact-match accuracy of the greedy reply (answer token, then end of turn; argmax over the full
    vocabulary) on the tenant's trained phrasings, or on the held-out paraphrases with
    ``heldout=True``. Works for a plain base model, a PeftModel with the adapter active, or any
    causal LM (full forward fallback)."""
    m = evaluate_detailed(model, tokenizer, task, **kwargs)
    return m["heldout_accuracy" if heldout else "accuracy"]


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 4) -> list[str]:
    """Real greedy generation (slow; for spot checks): the decoded reply of each example."""
    ids, mask = _left_pad(_prompt_ids(model, tokenizer, examples), tokenizer.pad_token_id or 0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]


# ---------------------------------------------------------------------------------------- training
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
    split = layers[0] if (cfg.split_forward and _backbone(model)[1] is not None) else None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    # base model: accuracy before training and (cached) lower-layer states of all prompts
    if split is not None:
        _lower_states(model, tokenizer, task.eval, split, cfg.eval_batch_size, cfg.shared_prefix)
    t_base = time.perf_counter()
    if base_metrics is None:
        base_metrics = evaluate_detailed(model, tokenizer, task, cfg.bf16, cfg.eval_batch_size, cfg.split_forward,
                                         cfg.shared_prefix, split_at=split)
    t_base = time.perf_counter() - t_base

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 1_000_003 + task.task_id)
        peft_model = get_peft_model(model, lora_config(cfg, total), adapter_name="default")
    rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + task.task_id)
    train_states = _lower_states(model, tokenizer, task.train, split, cfg.eval_batch_size, cfg.shared_prefix) \
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
            logits = _last_logits(peft_model, tokenizer, exs, split, cfg.bf16, st, cfg.shared_prefix)
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
