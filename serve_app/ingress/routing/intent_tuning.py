"""Teach the router's sentence embedder *intent*, not topic: LoRA on MiniLM's top layers, trained on
other people's customizations (plain torch + peft; no Ray).

all-MiniLM-L6-v2 was trained to put sentences on the same *subject* together, so "conjugate venir in
the futur simple" sits far from "a French tutor" and "how do navies fight piracy today" sits near "a
pirate voice". The intent corpus (``bench/data/routing/intent_corpus/``: tenants of 10 customizations
each, in domains the routing benchmark does not use, with requests *for* each customization, near
misses *about* its subject and everyday requests, written by authors who saw nothing of the router)
teaches the difference: per tenant, a request should score highest on its own customization's
documents and near misses and everyday requests below a learned bias (softmax over the tenant's
customizations plus "base", on the mean cosine to each customization's documents, as the recommender
scores).

Only LoRA matrices on the top ``top_layers`` transformer layers train; the layers below are frozen, so
their output is computed once per text and each step runs the top layers alone (minutes on one CPU
core). The result is a peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``, a few
hundred KB) that :class:`~serve_app.ingress.routing.embedders.MiniLMEmbedder` merges into the model at
load: no cost per request. The shipped one (:data:`INTENT_ADAPTER`) is written by
``python -m bench.routing_intent --save``, which also measures it on the routing benchmark's validation
files (docs/bench/routing_intent.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

INTENT_ADAPTER = Path(__file__).resolve().parent / "intent_minilm"


@dataclass(frozen=True)
class CorpusTenant:
    """One invented tenant: per customization its documents (description, uploaded examples), and labelled
    prompts ``(text, index of the customization or -1 for base)``."""

    name: str
    documents: list[list[str]]
    prompts: list[tuple[str, int]] = field(repr=False)


def load_intent_corpus(path: Path) -> list[CorpusTenant]:
    """Every ``*.json`` of ``path`` (``{"customizations": [{"name", "kind", "description", "examples",
    "on_topic", "near_miss"}], "general": [...]}``) as one tenant; near misses and everyday requests are
    labelled base (-1)."""
    tenants = []
    for f in sorted(Path(path).glob("*.json")):
        spec = json.loads(f.read_text())
        custom = spec["customizations"]
        prompts = [(p, k) for k, c in enumerate(custom) for p in c["on_topic"]]
        prompts += [(p, -1) for c in custom for p in c["near_miss"]] + [(p, -1) for p in spec["general"]]
        tenants.append(CorpusTenant(f.stem, [[c["description"], *c.get("examples", [])] for c in custom], prompts))
    if not tenants:
        raise FileNotFoundError(f"no intent corpus (*.json) in {path}")
    return tenants


@dataclass(frozen=True)
class IntentTuning:
    """Hyper-parameters of :func:`tune_intent` (chosen on the routing validation files, bench/routing_intent.py)."""

    top_layers: int = 2  # LoRA on this many top transformer layers; the rest frozen and cached
    steps: int = 200  # one tenant per step, round robin
    rank: int = 8
    lr: float = 1e-3
    batch: int = 32  # prompts per step (with all of the tenant's documents)
    max_tokens: int = 128
    seed: int = 0


def _pad(states: list, torch):
    """Right-padded (B, T, H) states and (B, T) mask from per-text (T_i, H) states."""
    h = torch.zeros(len(states), max(s.shape[0] for s in states), states[0].shape[1])
    m = torch.zeros(h.shape[:2], dtype=torch.long)
    for i, s in enumerate(states):
        h[i, :len(s)], m[i, :len(s)] = s, 1
    return h, m


def tune_intent(tenants: list[CorpusTenant], cfg: IntentTuning = IntentTuning(), model_path: Path | None = None,
                progress: Callable[[dict], None] | None = None):
    """A peft model (MiniLM + LoRA on its top layers) trained on ``tenants``; ``save_pretrained`` it to ship."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer
    from transformers.masking_utils import create_bidirectional_mask

    from serve_app.ingress.routing.embedders import minilm_path

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    path = Path(model_path) if model_path else minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModel.from_pretrained(path, local_files_only=True).eval()
    n_layers = base.config.num_hidden_layers
    if not 1 <= cfg.top_layers <= n_layers:
        raise ValueError(f"top_layers must be in 1..{n_layers}, got {cfg.top_layers}")
    first = n_layers - cfg.top_layers
    texts = sorted({d for t in tenants for docs in t.documents for d in docs} | {p for t in tenants for p, _ in t.prompts})
    lower = {}  # text -> (T, H) output of the frozen layers
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            chunk = texts[i:i + 32]
            enc = tok(chunk, padding=True, truncation=True, max_length=cfg.max_tokens, return_tensors="pt")
            states = base(**enc, output_hidden_states=True).hidden_states[first]
            for j, text in enumerate(chunk):
                lower[text] = states[j, :int(enc["attention_mask"][j].sum())].clone()
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.1,
                                            target_modules=["query", "key", "value", "dense"],
                                            layers_to_transform=list(range(first, n_layers))))
    top = model.base_model.model.encoder.layer[first:]

    def embed(batch: list[str]):
        h, mask = _pad([lower[t] for t in batch], torch)
        attn = create_bidirectional_mask(config=base.config, inputs_embeds=h, attention_mask=mask)
        for layer in top:
            h = layer(h, attn)
            h = h[0] if isinstance(h, tuple) else h
        w = mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    log_scale, bias = torch.tensor(3.0, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad] + [log_scale, bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    model.train()
    for step in range(cfg.steps):
        tenant = tenants[step % len(tenants)]
        docs = [d for ds in tenant.documents for d in ds]
        owner = torch.tensor([k for k, ds in enumerate(tenant.documents) for _ in ds])
        batch = rng.sample(tenant.prompts, min(cfg.batch, len(tenant.prompts)))
        e = embed(docs + [p for p, _ in batch])
        cos = e[len(docs):] @ e[:len(docs)].T
        scores = torch.stack([cos[:, owner == k].mean(1) for k in range(len(tenant.documents))], 1)
        logits = torch.cat([scores, bias.expand(len(scores), 1)], 1) * log_scale.exp()
        target = torch.tensor([len(tenant.documents) if k < 0 else k for _, k in batch])
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress and (step % 20 == 0 or step == cfg.steps - 1):
            progress({"event": "intent.progress", "step": step + 1, "of": cfg.steps, "loss": round(loss.item(), 4)})
    return model.eval()
