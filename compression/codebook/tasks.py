"""Many small, measurable LoRA tasks for one base model (tenant codebooks), their config and evaluation.

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

Phrasings are split three ways: the first ``TRAIN_TEMPLATES`` of each family are used for training
and for the primary metric ("the tenant's questions"); the next ``VAL_TEMPLATES`` are held-out
*validation* paraphrases (designs, thresholds and error budgets are chosen on them); the rest are
held-out *test* paraphrases, written after the others and independently of training, touched only
for final numbers (``tests/compression/test_codebook.py`` proves the three share no 4-word phrase).

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
``heldout_*`` (validation) and ``test_*`` paraphrases. :func:`generate_answers` does real greedy
generation for spot checks.

The split forward that makes training and evaluation cheap is in :mod:`.forward`; training and
the PEFT directory writer in :mod:`.train`; the resumable directory of trained adapters in
:mod:`.store`. The Ray Train job that trains many of them is ``train_jobs.lora_adapters``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from causal_lm import end_of_turn_id, left_pad
from compression.codebook.forward import answer_token_id, predict_logits, prompt_ids

OBJECTIVE = "codebook-v2: cross-entropy on the answer token and the end-of-turn token after it"
"""Recorded with every adapter (and part of the job's cache fingerprint): bump when training changes."""
TRAIN_TEMPLATES = 3
"""Phrasings [0, TRAIN_TEMPLATES) of every family are trained on; the rest are held out."""
VAL_TEMPLATES = 2
"""Phrasings [TRAIN_TEMPLATES, TRAIN_TEMPLATES + VAL_TEMPLATES) are validation paraphrases; the rest test."""
Split = Literal["train", "val", "test"]


def template_split(index: int) -> Split:
    """Which split phrasing ``index`` of a family belongs to."""
    if index < TRAIN_TEMPLATES:
        return "train"
    return "val" if index < TRAIN_TEMPLATES + VAL_TEMPLATES else "test"
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
                   "Crate {key}: what color is it tagged with?",
                   "Do you know the colour marking on storage crate {key}?",
                   "Please look up crate {key} and give me its color.",
                   "Which colour has been assigned to the {key} crate?"),
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
                   "Project {key}: what state is it in?",
                   "How far along is project {key}, status-wise?",
                   "Give me a quick status update on the {key} project.",
                   "In what stage is the {key} project currently?"),
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
                   "Ticket topic {key}: which team owns it?",
                   "Where do {key} tickets go?",
                   "I have a {key} ticket; which team should get it?",
                   "Which group deals with tickets about {key}?"),
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
                   "Service {key}: who is its owner?",
                   "Who is in charge of service {key}?",
                   "Name the engineer who maintains the {key} service.",
                   "Whom should I contact about the {key} service?"),
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
    heldout: bool = False  # phrasing not used in training (validation or test paraphrase)
    split: Split = "train"


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
    eval: list[Example] = Field(description="every key x every phrasing; `split` says train / val / test")

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
                key=key, template=ti, heldout=ti >= TRAIN_TEMPLATES, split=template_split(ti))
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


# ---------------------------------------------------------------------------------------- evaluation
def eval_logits(model, tokenizer, task: LoraTask, bf16: bool = False, batch_size: int = 32,
                split_forward: bool = True, shared_prefix: bool = True, split_at: int | None = None) -> torch.Tensor:
    """Logits [len(task.eval), 2, vocab] that :func:`evaluate_detailed` scores: at the answer position and
    (teacher-forced) at the end-of-turn position. Same arguments as evaluate_detailed."""
    was_training = model.training
    model.eval()
    try:
        return predict_logits(model, tokenizer, task.eval, bf16, batch_size, split_forward, shared_prefix,
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
    split = [ex.split for ex in task.eval]

    def mean(t: torch.Tensor, which: str) -> float:
        sel = torch.tensor([s == which for s in split])
        return round(float(t[sel].float().mean()), 4) if bool(sel.any()) else float("nan")

    out = {}
    for prefix, which in (("", "train"), ("heldout_", "val"), ("test_", "test")):
        out |= {f"{prefix}accuracy": mean(exact, which), f"{prefix}first_token_accuracy": mean(first, which),
                f"{prefix}choice_accuracy": mean(choice, which)}
    return out | {"chance": round(1.0 / len(task.answer_vocab), 4)}


def evaluate_detailed(model, tokenizer, task: LoraTask, bf16: bool = False, batch_size: int = 32,
                      split_forward: bool = True, shared_prefix: bool = True,
                      split_at: int | None = None) -> dict[str, float]:
    """Exact-match and choice accuracy on the trained phrasings (``accuracy``), the validation
    paraphrases (``heldout_accuracy``) and the test paraphrases (``test_accuracy``).

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
    ids, mask, _ = left_pad(prompt_ids(model, tokenizer, examples), tokenizer.pad_token_id or 0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]
