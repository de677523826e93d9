"""Insertion runtime: splice a tenant's expert into the frozen LLM's forward pass (paper §1.0).

A row served with an expert gets n extra *slot* positions appended after its prompt (after the
generation prompt). At the input of decoder layer k (the bundle's layer) the slots' residual
stream is overwritten by ``decoder(expert(encoder(h_k[prompt])))``; layers k..L-1 read the slots
through ordinary causal attention and the answer is read at the last slot.

What slots hold at layers < k: the decoder's fixed ``placeholder`` (seeded Gaussian at the
embedding table's scale, see :func:`llamdex.connectors.gaussian_placeholder`) -- the paper's
Gaussian pads, but drawn once instead of per forward. It never influences the slot answer (the
prompt cannot see the slots, and their layer-k input is overwritten), but tokens generated
*after* the slots attend to the slots' keys/values at layers < k too, so a fixed choice keeps
generation deterministic and identical between batched and single-row serving.

Batches may mix rows with different experts (even different k and n) and rows without expert:
each row is right-aligned to the same width (extra left pads for rows with fewer slots), and rows
without expert equal a plain forward of the model (left padding is masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from causal_lm import backbone, left_pad, num_layers
from llamdex.codec import FeatureCodec
from llamdex.connectors import Decoder
from llamdex.connectors_io import ConnectorsSpec, load_connectors
from llamdex.embedding import shared_minilm
from llamdex.encoder import Encoder
from llamdex.expert import ExpertError, ExpertMLP, ExpertSpec, load_expert, predict_proba
from llamdex.literals import LiteralBatch, layout, token_literals
from llamdex.llm_ops import overwrite_at_layer
from llamdex.meaning import MeaningConfig, MeaningRead, MeaningReader, user_text
from llamdex.prompting import chat_prompt_ids
from llamdex.schema import load_schema


@dataclass(frozen=True)
class Reading:
    """What a bundle made of prompts' layer-k states: slot vectors (B, n, d), expert input (B, m),
    which features each prompt states (B, F) bool, and the categories read by meaning per row."""

    slots: torch.Tensor
    features: torch.Tensor
    stated: torch.Tensor
    by_meaning: list[dict[str, MeaningRead]]


@dataclass(frozen=True)
class Bundle:
    """Everything needed to serve one tenant expert: connectors, the expert, spec and codec."""

    encoder: Encoder
    decoder: Decoder
    expert: ExpertMLP
    spec: ConnectorsSpec
    codec: FeatureCodec
    expert_spec: ExpertSpec | None = None
    origin: tuple[str, str] | None = None
    """(expert dir, connectors dir) it was loaded from (an engine in another process reloads it there)."""
    meaning: MeaningReader | None = None
    """Reads categories the encoder left unstated by meaning (:mod:`llamdex.meaning`); None = off."""

    @torch.no_grad()
    def read(self, hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None,
             literals: LiteralBatch | None = None) -> Reading:
        """Prompt hidden states at layer k (B, T, d) + mask [+ the prompt's input embeddings]
        [+ its literal channels] -> :class:`Reading`. With a meaning reader (and literals carrying the
        prompts' texts), a category the encoder left unstated is read from the user's words when the
        reader is sure, before the expert runs."""
        raw = self.encoder(hidden, mask, embeds, literals)
        features, stated = self.encoder.activate(raw), self.encoder.stated(raw)
        by_meaning: list[dict[str, MeaningRead]] = [{} for _ in range(hidden.shape[0])]
        if self.meaning is not None and literals is not None and literals.texts:
            features, stated = features.clone(), stated.clone()
            heads = self.encoder.cfg.features
            for r, text in enumerate(literals.texts):
                said = [h.name for h, s in zip(heads, stated[r].tolist(), strict=True) if s]
                by_meaning[r] = self.meaning.read(user_text(text, self.spec.system_prompt), skip=said)
                for i, h in enumerate(heads):
                    if h.name in by_meaning[r] and h.categories:
                        cols = self.codec.slices[h.name]
                        features[r, cols] = 0
                        features[r, cols.start + h.categories.index(by_meaning[r][h.name].value)] = 1
                        stated[r, i] = True
        return Reading(self.decoder(self.expert(features)), features, stated, by_meaning)

    def slots(self, hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None,
              literals: LiteralBatch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`read` as (slot vectors (B, n, d), features (B, m), stated (B, F) bool)."""
        reading = self.read(hidden, mask, embeds, literals)
        return reading.slots, reading.features, reading.stated

    def with_meaning(self, embedder, config: MeaningConfig | None = None) -> Bundle:
        """This bundle reading unstated categories by meaning with ``embedder`` (e.g.
        :func:`llamdex.embedding.shared_minilm`); ``embedder=None`` turns the reader off."""
        if embedder is None:
            return replace(self, meaning=None)
        return replace(self, meaning=MeaningReader(load_schema(self.spec.tenant_schema), embedder, config))

    def with_expert(self, expert: ExpertMLP, expert_spec: ExpertSpec | None = None) -> Bundle:
        """This bundle with another expert (the tenant's real/DP one replacing the synthetic one),
        validated to consume and produce exactly what the connectors were trained around."""
        spec, arch = self.spec, expert.arch
        problems = [f"expert.{name}: {got} but the connectors expect {want}; fix: use an expert trained on "
                    f"schema {spec.tenant_schema['name']!r}" for name, got, want in (
                        ("input_size", arch.input_size, spec.input_size),
                        ("output_size", arch.output_size, spec.output_size)) if got != want]
        if expert_spec is not None:
            problems += [f"expert.json.{name}: {got!r} but the connectors expect {want!r}; fix: use an expert "
                         "trained on the connectors' schema" for name, got, want in (
                             ("input_columns", expert_spec.input_columns, spec.input_columns),
                             ("class_names", expert_spec.class_names, spec.class_names)) if got != want]
        if problems:
            raise ExpertError(problems)
        return replace(self, expert=expert.eval().requires_grad_(False), expert_spec=expert_spec)


def load_bundle(expert_dir: str | Path, connectors_dir: str | Path, expected_model_hash: str,
                meaning: MeaningConfig | None = MeaningConfig()) -> Bundle:
    """Connectors (refused unless built for ``expected_model_hash``) + the tenant's expert, whose
    layout is checked against the connectors' schema (feature order, columns, sizes, classes); with
    ``meaning`` (the default: on, validated thresholds), unstated categories are read by meaning
    through the process's shared all-MiniLM-L6-v2; None turns that off."""
    encoder, decoder, spec = load_connectors(connectors_dir, expected_model_hash)
    expert, expert_spec = load_expert(expert_dir, schema=spec.tenant_schema)
    bundle = Bundle(encoder, decoder, expert, spec, spec.codec(), origin=(str(expert_dir), str(connectors_dir)))
    if meaning is not None and encoder.copies:
        bundle = bundle.with_meaning(shared_minilm(), meaning)
    return bundle.with_expert(expert, expert_spec)


def _check(model, bundles: list[Bundle]) -> None:
    d, n_layers = model.config.hidden_size, num_layers(model)
    for b in bundles:
        if b.spec.hidden_size != d or b.spec.num_layers != n_layers:
            raise ValueError(f"connectors.json: built for {b.spec.base_model_id!r} (d={b.spec.hidden_size}, "
                             f"{b.spec.num_layers} layers) but this model has d={d}, {n_layers} layers; "
                             "fix: serve these connectors on their own base model")


def _forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             experts: Sequence[Bundle | None], use_cache: bool, tokenizer=None):
    """One forward with slots appended/overwritten; returns (output, mask, positions, {row: features},
    {row: which features the question stated}, {row: categories read by meaning})."""
    bundles = [b for b in experts if b is not None]
    _check(model, bundles)
    prompt_literals = None
    if any(b.encoder.copies for b in bundles):
        if tokenizer is None:
            raise ValueError("tokenizer: these connectors copy values from the prompt; fix: pass the model's "
                             "tokenizer")
        prompt_literals = {r: token_literals(tokenizer, input_ids[r][attention_mask[r].bool()].tolist())
                           for r, b in enumerate(experts) if b is not None and b.encoder.copies}
    n_row = [0 if b is None else b.spec.num_slots for b in experts]
    most = max(n_row)
    batch, width = input_ids.shape
    total = width + most
    embed = backbone(model).embed_tokens
    hidden = torch.zeros(batch, total, embed.embedding_dim, dtype=embed.weight.dtype)
    mask = torch.zeros(batch, total, dtype=attention_mask.dtype)
    positions = torch.zeros(batch, total, dtype=position_ids.dtype)
    for r, (b, n) in enumerate(zip(experts, n_row, strict=True)):
        lo, hi = most - n, most - n + width  # the prompt's columns in the new layout
        hidden[r, lo:hi] = embed(input_ids[r])
        mask[r, lo:hi], positions[r, lo:hi] = attention_mask[r], position_ids[r]
        if b is not None:
            hidden[r, hi:] = b.decoder.placeholder.to(hidden.dtype)
            mask[r, hi:] = 1
            positions[r, hi:] = position_ids[r, -1] + 1 + torch.arange(n)
    features: dict[int, torch.Tensor] = {}
    stated: dict[int, torch.Tensor] = {}
    by_meaning: dict[int, dict[str, MeaningRead]] = {}

    def overwrite(layer: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            for bundle in {id(b): b for b in bundles if b.spec.layer == layer}.values():
                rows = [r for r, b in enumerate(experts) if b is bundle]
                cut = total - bundle.spec.num_slots
                lits = None
                if prompt_literals is not None and bundle.encoder.copies:  # real tokens end at column `cut`
                    lits = layout([prompt_literals[r] for r in rows], bundle.encoder.cfg.vocabulary, cut, left=True)
                reading = bundle.read(h[rows, :cut], mask[rows, :cut], hidden[rows, :cut], lits)
                h[rows, cut:] = reading.slots.to(h.dtype)
                features.update(zip(rows, reading.features, strict=True))
                stated.update(zip(rows, reading.stated, strict=True))
                by_meaning.update(zip(rows, reading.by_meaning, strict=True))
            return h
        return fn

    with ExitStack() as stack:
        for layer in sorted({b.spec.layer for b in bundles}):
            stack.enter_context(overwrite_at_layer(model, layer, overwrite(layer)))
        out = model(inputs_embeds=hidden, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                    logits_to_keep=1)
    return out, mask, positions, features, stated, by_meaning


def prefill_with_experts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                         experts: Sequence[Bundle | None], tokenizer=None):
    """Batched prefill for a generation engine (left-padded ``input_ids`` (B, T), mask, positions).

    Returns ``(last_logits (B, V), past_key_values, attention_mask, position_ids)`` over the new
    layout (width T + max n): continue decoding by appending 1 to the mask and using
    ``position_ids[:, -1:] + 1``, exactly as after a plain prefill. For rows with an expert the last
    logits are read at the last slot; rows with ``None`` equal a plain forward of their prompt.
    ``tokenizer`` is needed when a bundle's encoder copies literals (it parses the prompt's tokens).
    """
    if len(experts) != input_ids.shape[0]:
        raise ValueError(f"experts: {len(experts)} entries for {input_ids.shape[0]} rows; fix: one per row")
    out, mask, positions, _, _, _ = _forward(model, input_ids, attention_mask, position_ids, experts, use_cache=True,
                                       tokenizer=tokenizer)
    return out.logits[:, -1, :], out.past_key_values, mask, positions


@torch.no_grad()
def predict_many(model, tokenizer, bundles: Sequence[Bundle], questions: Sequence[str]) -> list[dict[str, Any]]:
    """Answer ``questions[i]`` with ``bundles[i]`` in ONE batched forward (bundles may differ per row).

    Per row: ``{"label", "probabilities" (softmax over the class tokens at the last slot),
    "features" (what the encoder read, decoded by the codec; None for a feature the question does not
    state), "stated" / "not_stated" (feature names: read from the question / not in it -- the expert
    then got the schema's default, or 'missing' for a category), "encoded_features" (codec space, as
    fed to the expert), "expert_probabilities" (the expert on those features)}``. Rows are
    left-padded; each row's prompt uses its own bundle's system prompt.
    """
    if len(bundles) != len(questions):
        raise ValueError(f"bundles: {len(bundles)} entries for {len(questions)} questions; fix: one per question")
    if not questions:
        return []
    prompts = [chat_prompt_ids(tokenizer, b.spec.system_prompt, [q])[0] for b, q in zip(bundles, questions, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, pos = left_pad(prompts, pad)
    out, _, _, feats, stated, by_meaning = _forward(model, ids, mask, pos, list(bundles), use_cache=False,
                                                    tokenizer=tokenizer)
    results = []
    for r, bundle in enumerate(bundles):
        logits = out.logits[r, -1, bundle.spec.class_token_ids].float()
        names = bundle.spec.class_names
        expert_probs = predict_proba(bundle.expert, feats[r][None])[0].tolist()
        read = bundle.codec.decode(feats[r][None].numpy())[0]
        said = {f.name: bool(s) for f, s in zip(bundle.encoder.cfg.features, stated[r].tolist(), strict=True)}
        results.append({"label": names[int(logits.argmax())],
                        "probabilities": dict(zip(names, torch.softmax(logits, -1).tolist(), strict=True)),
                        "features": {k: (v if said[k] else None) for k, v in read.items()},
                        "stated": [k for k in read if said[k]], "not_stated": [k for k in read if not said[k]],
                        "read_by_meaning": {k: {"value": m.value, "clause": m.clause, "similarity": m.similarity}
                                            for k, m in by_meaning.get(r, {}).items()},
                        "encoded_features": feats[r].tolist(),
                        "expert_probabilities": dict(zip(names, expert_probs, strict=True))})
    return results


def predict(model, tokenizer, bundle: Bundle, question: str) -> dict[str, Any]:
    """Answer one question in one forward pass: the class-token argmax at the last slot
    (see :func:`predict_many` for the fields)."""
    return predict_many(model, tokenizer, [bundle], [question])[0]


@torch.no_grad()
def greedy_decode(model, last_logits: torch.Tensor, past_key_values, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) from a prefill's outputs (no stopping on EOS)."""
    tokens = []
    for step in range(max_new_tokens):
        nxt = last_logits.argmax(-1)
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=True)
        last_logits, past_key_values = out.logits[:, -1, :], out.past_key_values
    return torch.stack(tokens, dim=1)
