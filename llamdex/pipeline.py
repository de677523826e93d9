"""Connector training from the public schema alone: synthetic rows -> questions -> cache -> two stages.

1. :func:`prepare_data`: ``make_synthetic`` rows (80% train / 20% held out), the server's
   *synthetic* expert trained on the train part without DP (``train_expert(epsilon=None)``; the
   tenant's real/DP expert is swapped in at serving, paper §2.3), plus coverage rows (values
   spread over each range, :mod:`llamdex.coverage`; labelled by the synthetic expert's argmax);
   questions from the training grammar (:mod:`llamdex.grammar`) for training rows and from the
   disjoint validation family (:mod:`llamdex.family`) for evaluation rows, chat-templated with a
   one-word-answer system prompt and the generation prompt. A question may leave features out
   (or write them as unknown): the encoder's target for those is "not stated".
2. :func:`cache_prompts`: one frozen-LLM pass (hidden states at layer(s) k; keys/values at layers
   >= k for the stage-2 and evaluation prompts).
3. :func:`fit_layer`: stage 1 (encoder), stage 2 (decoder), evaluation on held-out phrasings, spec.

:func:`train_connectors` runs all three for one layer within an optional time budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from causal_lm import end_of_turn_id, num_layers
from llamdex.codec import FeatureCodec
from llamdex.connectors import Decoder, DecoderConfig, gaussian_placeholder
from llamdex.connectors_io import ConnectorsSpec, TrainingReport, build_spec
from llamdex.coverage import coverage_rows
from llamdex.dp_training import train_expert
from llamdex.encoder import Encoder, EncoderConfig, feature_heads
from llamdex.expert import ExpertArch, ExpertMLP, ExpertSpec, predict_proba
from llamdex.family import FamilyRenderer, family_file
from llamdex.hidden_cache import AnswerInputs, PromptCache, build_cache
from llamdex.literals import PromptLiterals, candidates, token_literals, value_tokens
from llamdex.prompting import AnswerTokens, answer_tokens, chat_prompt_ids
from llamdex.questions import QuestionGenerator
from llamdex.render import Question
from llamdex.schema import TenantSchema, load_schema
from llamdex.stage_checkpoint import EncoderCheckpoint
from llamdex.stages import (
    FitSettings,
    Progress,
    PromptExtras,
    StageReport,
    decoder_accuracy,
    encoder_features,
    feature_fidelity,
    train_decoder,
    train_encoder,
)
from llamdex.synthetic import make_synthetic


@dataclass(frozen=True)
class BudgetShares:
    """How ``ConnectorsConfig.time_budget_s`` is split. The hidden-state cache may use ``cache`` of the
    whole budget (training prompts past it are skipped); of what is left, the encoder trains until
    ``encoder`` and the decoder until ``decoder_end`` (the rest: held-out evaluation, saving).

    The encoder gets most of it: on wine's 20-minute run with the earlier split (0.5 / 0.35 / 0.92)
    the decoder's loss after 5 epochs was already that of 10 (1.007 vs 0.999), while the encoder,
    re-planned to 4 epochs, ended at loss 0.34 against 0.002 after 20 (docs/llamdex.md, Cost).
    Not config fields: config fields key the benchmark's connectors cache."""

    cache: float = 0.4
    encoder: float = 0.75
    decoder_end: float = 0.95
    fit_floor: float = 0.6  # training (both stages + evaluation) never gets less than this share of the
    #   budget, even when the cache overran its own share on a busy machine: the run then overruns
    #   instead of publishing connectors trained for seconds (a `make demo` on a loaded box once cached
    #   for 890 s of a 600 s budget and trained the encoder for 9.6 s). 0.6 = what the cache's share
    #   leaves when it is used up exactly.


BUDGET_SHARES = BudgetShares()
OVERRUN_NOTE = "time budget overrun"  # how a training report's note about the floor starts


@dataclass(frozen=True)
class ConnectorsConfig:
    """Every knob of connector training, with the defaults used for SmolLM2-135M on 2 CPU cores."""

    layer: int = 16  # insertion layer k (input of decoder layer k; 0 = embeddings); SmolLM2 sweep: 10~16 best
    num_slots: int = 10  # n appended slots (paper default)
    synthetic_rows: int = 10_000  # synthetic table (paper); first 80% train, last 20% held out
    train_questions: int = 2000  # training rows phrased with the 'train' family (stage 1)
    stage2_questions: int = 800  # first rows of those, with cached keys/values (stage 2)
    eval_questions: int = 200  # held-out rows phrased with the 'heldout' family (evaluation)
    coverage_share: float = 0.5  # share of train/eval rows from coverage_rows (see llamdex.coverage)
    coverage_log_share: float = 0.5  # share of their numeric values with log-uniform magnitudes (llamdex.coverage)
    coverage_default_share: float = 0.2  # share of their numeric values at the schema's default (llamdex.coverage)
    enc_width: int = 256  # encoder width (queries, memory projection)
    enc_heads: int = 8
    enc_layers: int = 3  # cross-attention blocks (titanic test questions: 3 > 1 on every numeric feature)
    enc_head_hidden: int = 128  # per-feature MLP head width
    enc_self_layers: int = 0  # bidirectional self-attention layers over the prompt memory (0 = none)
    enc_token_inputs: bool = False  # also read token embeddings (exact digits)
    enc_positions: bool = False  # sinusoidal positions over real tokens
    enc_dropout: float = 0.0  # (self-attention layers + token inputs + positions generalised worse to the
    #                           held-out phrasings on titanic: age MAE 7.4 vs 5.9, 8x the training time)
    enc_conv_layers: int = 3  # bidirectional local context over the memory (encoder.py)
    enc_conv_kernel: int = 11
    enc_anchor: bool = True  # features also find their own label; distance bias for the pointer (encoder.py)
    enc_copy_literals: bool = True  # features copy the value the encoder points at (encoder.py, literals.py)
    enc_epochs: int = 20  # paper: 30 (copying learns faster: 12 epochs already read bank's categories at 100 %)
    enc_lr: float = 1e-3  # small encoder from scratch (the paper fine-tunes RoBERTa at 5e-5)
    enc_batch: int = 32  # paper: 32
    numeric_weight: float = 10.0  # numeric MSE weight vs category/bool CE (titanic sweep: 10 beats 1)
    dec_ffn: int = 512  # SwiGLU width F (paper CLI default)
    dec_norm: Literal["layernorm", "residual_rms"] = "residual_rms"  # "layernorm" (paper) or "residual_rms" (measured; see connectors.py)
    dec_epochs: int = 10  # paper: 10
    dec_lr: float = 1e-3
    dec_batch: int = 16
    dec_objective: Literal["labels", "expert"] = "expert"  # "labels" (paper) or transmit the expert (stages.py)
    dec_random_share: float = 0.5  # "expert": share of each batch with random expert outputs
    dec_sharpen: float = 0.2  # temperature on the expert's distribution the LLM transmits (connectors.py; 1 = paper;
    #                          validation agreement with the expert: wine 85.7 % at 1 -> 99.0 % at 0.2, titanic 97.9 -> 99.3 %)
    dec_end_weight: float = 0.1  # weight of "end the turn right after the answer token" (stages.train_decoder; 0 = off)
    weight_decay: float = 0.01
    warmup_frac: float = 0.05  # of all steps (paper: 500 steps of ~7,500)
    expert_epochs: int = 10  # synthetic expert (paper: AdamW, lr 1e-4, batch 64, 10 epochs)
    expert_lr: float = 1e-3
    expert_batch: int = 64
    cache_dtype: str = "bfloat16"  # storage of cached hidden states / keys / values
    cache_batch: int = 16
    time_budget_s: float | None = None  # whole run; split by BUDGET_SHARES (BudgetShares above)
    seed: int = 0


@dataclass
class ConnectorData:
    """Everything derived from the schema: prompts (train rows, then eval rows), targets, expert."""

    schema: TenantSchema
    codec: FeatureCodec
    answers: AnswerTokens
    questions: list[str]
    prompts: list[list[int]]
    x: torch.Tensor  # (Q, m) codec-encoded true features of each prompt's row (what the expert sees)
    y: torch.Tensor  # (Q,) synthetic labels
    x_read: torch.Tensor  # (Q, m) what a perfect reader of each question outputs (unstated -> fill / missing)
    train_rows: list[int]
    stage2_rows: list[int]
    eval_rows: list[int]
    expert: ExpertMLP
    expert_spec: ExpertSpec
    literals: list[PromptLiterals]  # per prompt: literal kind/value of each token
    value_tokens: list[dict[str, list[int]]]  # per prompt: numeric/bool feature -> tokens of its written value
    label_tokens: list[dict[str, list[int]]]  # ... and of its written label
    end_of_turn: int | None = None  # the token that ends the assistant's turn (stage 2: said after the answer)

    def extras(self, model) -> PromptExtras:
        """What the encoder reads besides hidden states (see :class:`llamdex.stages.PromptExtras`)."""
        return PromptExtras(model.get_input_embeddings(), self.literals, self.value_tokens, self.label_tokens)


@dataclass
class TrainedConnectors:
    """Result of :func:`fit_layer`: save with ``save_connectors`` (and ``save_expert`` for the expert)."""

    encoder: Encoder
    decoder: Decoder
    spec: ConnectorsSpec
    expert: ExpertMLP
    expert_spec: ExpertSpec


def locate_values(tokenizer, schema: TenantSchema, prompts: list[list[int]], questions: list[Question]
                  ) -> tuple[list[PromptLiterals], list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """Per prompt: its literals, and the tokens where the grammar wrote each stated feature's value
    (those the encoder may copy it from: :func:`llamdex.literals.candidates`) and label -- the copy
    pointer's training targets."""
    heads = feature_heads(FeatureCodec(schema))
    vocabulary = tuple(tuple(tuple(p) for p in h.phrases) for h in heads)
    kinds = [h.kind for h in heads]
    literals = [token_literals(tokenizer, p) for p in prompts]
    values_at, labels_at = [], []
    for lit, q in zip(literals, questions, strict=True):
        allowed = candidates(lit.kinds, lit.mentions(vocabulary), kinds)
        spans = {h.name: q.all_spans(h.name) for h in heads if h.name in q.stated}
        values_at.append(value_tokens(lit, q.text, spans, {h.name: allowed[j] for j, h in enumerate(heads)}))
        labels_at.append(value_tokens(lit, q.text, {k: [v] for k, v in q.label_spans.items()},
                                      dict.fromkeys(h.name for h in heads)))
    return literals, values_at, labels_at


def read_targets(codec: FeatureCodec, df: pd.DataFrame, questions: list[Question]) -> np.ndarray:
    """(N, m) what a perfect reader outputs for each question: the row's features where stated, the
    schema default (numeric/bool; :func:`llamdex.encoder.feature_heads` fills) or 'missing'
    (category) where the question does not state them."""
    x = codec.encode(df)
    fills = {h.name: h.fill for h in feature_heads(codec)}
    for r, q in enumerate(questions):
        for f in codec.features:
            if f.name not in q.stated:
                cols = codec.slices[f.name]
                x[r, cols] = 0.0 if f.type == "category" else fills[f.name]
    return x


def prepare_data(tokenizer, schema: TenantSchema | dict | str, cfg: ConnectorsConfig,
                 progress: Progress | None = None) -> ConnectorData:
    """Synthetic rows, the synthetic expert, questions and chat prompts (see module docstring)."""
    schema = load_schema(schema)
    codec = FeatureCodec(schema)
    df, labels = make_synthetic(schema, n_rows=cfg.synthetic_rows, seed=cfg.seed)
    x_all = codec.encode(df)
    n_train = int(0.8 * len(df))
    arch = ExpertArch.from_schema(schema)
    start = time.perf_counter()
    on_epoch = None if progress is None else (
        lambda r: progress(StageReport("expert", r.epoch, r.epochs, r.loss, time.perf_counter() - start)))
    expert, ledger = train_expert(x_all[:n_train], labels[:n_train], arch, epsilon=None, delta=1.0 / n_train,
                                  epochs=cfg.expert_epochs, batch_size=cfg.expert_batch, lr=cfg.expert_lr,
                                  max_grad_norm=1.0, seed=cfg.seed, progress=on_epoch)
    expert.eval().requires_grad_(False)
    cov_train = round(cfg.train_questions * cfg.coverage_share)
    cov_eval = round(cfg.eval_questions * cfg.coverage_share)
    syn_train = list(range(min(cfg.train_questions - cov_train, n_train)))
    syn_held = list(range(n_train, n_train + min(cfg.eval_questions - cov_eval, len(df) - n_train)))
    cov = coverage_rows(schema, cov_train + cov_eval, seed=cfg.seed, log_share=cfg.coverage_log_share,
                        default_share=cfg.coverage_default_share)
    x_cov = codec.encode(cov)
    y_cov = predict_proba(expert, x_cov).argmax(1)  # coverage rows have no synthetic label: the expert's
    order = np.random.default_rng(cfg.seed).permutation(len(syn_train) + cov_train)  # mix both kinds
    train_df = pd.concat([df.iloc[syn_train], cov.iloc[:cov_train]], ignore_index=True).iloc[order]
    held_df = pd.concat([df.iloc[syn_held], cov.iloc[cov_train:]], ignore_index=True)
    x = np.concatenate([x_all[syn_train], x_cov[:cov_train]])[order]
    y = np.concatenate([labels[syn_train], y_cov[:cov_train]])[order]
    x = np.concatenate([x, x_all[syn_held], x_cov[cov_train:]])
    y = np.concatenate([y, labels[syn_held], y_cov[cov_train:]])
    gen = QuestionGenerator(schema, seed=cfg.seed)
    composed = [gen.compose(r, "train") for r in train_df.to_dict(orient="records")]
    renderer = FamilyRenderer(schema, family_file("validation"), seed=cfg.seed)
    composed += [renderer.compose(r) for r in held_df.to_dict(orient="records")]
    questions = [c.text for c in composed]
    x_read = read_targets(codec, pd.concat([train_df, held_df], ignore_index=True), composed)
    answers = answer_tokens(tokenizer, codec.class_names)
    prompts = chat_prompt_ids(tokenizer, answers.system_prompt, questions)
    literals, values_at, labels_at = locate_values(tokenizer, schema, prompts, composed)
    q = len(train_df)
    return ConnectorData(
        schema=schema, codec=codec, answers=answers, questions=questions, prompts=prompts,
        x=torch.from_numpy(x), y=torch.from_numpy(y.astype(np.int64)), x_read=torch.from_numpy(x_read),
        train_rows=list(range(q)), stage2_rows=list(range(min(cfg.stage2_questions, q))),
        eval_rows=list(range(q, len(questions))), expert=expert, expert_spec=ExpertSpec.build(schema, arch, ledger),
        literals=literals, value_tokens=values_at, label_tokens=labels_at, end_of_turn=end_of_turn_id(tokenizer))


def cache_prompts(model, tokenizer, data: ConnectorData, layers: list[int], cfg: ConnectorsConfig,
                  progress: Progress | None = None, deadline: float | None = None) -> PromptCache:
    """One frozen pass: hidden states at ``layers`` for all prompts, keys/values from min(layers)
    for the stage-2 and evaluation prompts (cached first; the deadline only skips training prompts),
    and for those, every class's answer-token state after the slots (what follows the answer)."""
    on_batch = None if progress is None else (
        lambda done, total, sec: progress(StageReport("cache", done, total, float("nan"), sec)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    placeholder = gaussian_placeholder(model.get_input_embeddings().weight, cfg.num_slots, cfg.seed)
    answers = AnswerInputs(placeholder, data.answers.ids)  # also measured when not trained (dec_end_weight 0)
    return build_cache(model, data.prompts, layers, pad, kv_from=min(layers),
                       kv_rows=data.stage2_rows + data.eval_rows, batch_size=cfg.cache_batch,
                       dtype=getattr(torch, cfg.cache_dtype), progress=on_batch, deadline=deadline, answers=answers)


def residual_rms(cache: PromptCache, layer: int, rows: list[int]) -> float:
    """Median per-token RMS of the residual stream entering ``layer`` (robust to massive activations)."""
    flat = torch.cat([cache.hidden[layer][i].float() for i in rows[:256]])
    return float(flat.pow(2).mean(-1).sqrt().median())


def init_connectors(model, codec: FeatureCodec, answers: AnswerTokens, cfg: ConnectorsConfig, *, model_id: str,
                    model_hash: str, scale: float = 1.0) -> tuple[Encoder, Decoder, ConnectorsSpec]:
    """Freshly initialised (untrained) connectors for ``model`` at ``cfg.layer`` and their spec.

    ``scale`` multiplies the decoder's LayerNorm output (use the residual RMS for 'residual_rms').
    """
    d = model.config.hidden_size
    torch.manual_seed(cfg.seed)
    encoder = Encoder(EncoderConfig(hidden_size=d, features=feature_heads(codec), width=cfg.enc_width,
                                    heads=cfg.enc_heads, layers=cfg.enc_layers, head_hidden=cfg.enc_head_hidden,
                                    self_layers=cfg.enc_self_layers, token_inputs=cfg.enc_token_inputs,
                                    positions=cfg.enc_positions, dropout=cfg.enc_dropout,
                                    conv_layers=cfg.enc_conv_layers, conv_kernel=cfg.enc_conv_kernel, anchor=cfg.enc_anchor,
                                    copy_literals=cfg.enc_copy_literals))
    decoder = Decoder(DecoderConfig(input_size=codec.output_size, hidden_size=d, num_slots=cfg.num_slots,
                                    ffn_hidden=cfg.dec_ffn, norm=cfg.dec_norm, scale=scale,
                                    sharpen=cfg.dec_sharpen))
    decoder.placeholder.copy_(gaussian_placeholder(model.get_input_embeddings().weight, cfg.num_slots, cfg.seed))
    spec = build_spec(model_id=model_id, model_hash=model_hash, num_layers=num_layers(model), schema=codec.schema,
                      layer=cfg.layer, encoder=encoder.cfg, decoder=decoder.cfg, class_token_ids=answers.ids,
                      class_token_strings=answers.strings, system_prompt=answers.system_prompt)
    return encoder, decoder, spec


def fit_layer(model, data: ConnectorData, cache: PromptCache, cfg: ConnectorsConfig, *, model_id: str,
              model_hash: str, progress: Progress | None = None, budget_s: float | None = None,
              resume: EncoderCheckpoint | None = None,
              on_encoder: Callable[[EncoderCheckpoint], None] | None = None) -> TrainedConnectors:
    """Stage 1 + stage 2 at ``cfg.layer`` on a cache holding it, then held-out evaluation and the spec.

    ``resume``: a stage-1 checkpoint of this run (:mod:`llamdex.stage_checkpoint`) -- the encoder is
    loaded instead of trained. ``on_encoder`` receives the checkpoint as soon as stage 1 ends.
    """
    start = time.perf_counter()
    layer = cfg.layer
    train_rows = cache.cached(data.train_rows)  # a time budget may have skipped some
    rms = residual_rms(cache, layer, train_rows)
    encoder, decoder, spec = init_connectors(model, data.codec, data.answers, cfg, model_id=model_id,
                                             model_hash=model_hash,
                                             scale=rms if cfg.dec_norm == "residual_rms" else 1.0)
    enc_deadline = dec_deadline = None
    if budget_s is not None:
        enc_deadline = start + BUDGET_SHARES.encoder * budget_s
        dec_deadline = start + BUDGET_SHARES.decoder_end * budget_s
    enc_set = FitSettings(cfg.enc_epochs, cfg.enc_lr, cfg.enc_batch, cfg.weight_decay, cfg.warmup_frac, cfg.seed)
    if resume is not None:
        encoder.load_state_dict(resume.state)
        encoder.eval()
        enc_losses = resume.losses
    else:
        enc_losses = train_encoder(encoder, cache, layer, data.x_read, train_rows, enc_set, cfg.numeric_weight,
                                   progress, enc_deadline, data.extras(model))
    t_enc = time.perf_counter()
    if resume is None and on_encoder is not None:
        on_encoder(EncoderCheckpoint(state=encoder.state_dict(), losses=enc_losses, seconds=t_enc - start))
    dec_set = FitSettings(cfg.dec_epochs, cfg.dec_lr, cfg.dec_batch, cfg.weight_decay, cfg.warmup_frac, cfg.seed)
    dec_losses = train_decoder(decoder, model, data.expert, cache, layer, data.x, data.y, data.stage2_rows,
                               data.answers.ids, dec_set, progress, dec_deadline, cfg.dec_objective,
                               cfg.dec_random_share, data.end_of_turn, cfg.dec_end_weight)
    t_dec = time.perf_counter()
    report = evaluate(model, data, cache, layer, encoder, decoder)
    report.config = asdict(cfg) | {"residual_rms": rms, "train_prompts": len(train_rows),
                                   "threads": torch.get_num_threads()}
    report.stage1_losses, report.stage2_losses = enc_losses, dec_losses
    report.seconds = {"cache": cache.seconds, "stage1": t_enc - start, "stage2": t_dec - t_enc,
                      "evaluation": time.perf_counter() - t_dec}
    spec = spec.model_copy(update={"training": report})
    return TrainedConnectors(encoder, decoder, spec, data.expert, data.expert_spec)


def evaluate(model, data: ConnectorData, cache: PromptCache, layer: int, encoder: Encoder, decoder: Decoder
             ) -> TrainingReport:
    """Held-out phrasings: per-feature fidelity of the encoder, stage-2 accuracy teacher-forced
    (true features) and end to end (encoder features), each vs the synthetic labels."""
    rows = data.eval_rows
    encoded = encoder_features(encoder, cache, layer, rows, extras=data.extras(model))
    true = data.x[rows]
    fidelity = feature_fidelity(data.codec, encoded, data.x_read[rows], data.x[data.train_rows])
    args = (decoder, model, data.expert, cache, layer)
    forced = decoder_accuracy(*args, true, data.y, rows, data.answers.ids, end_of_turn=data.end_of_turn)
    e2e = decoder_accuracy(*args, encoded, data.y, rows, data.answers.ids)
    stage2 = {f"teacher_forced_{k}": v for k, v in forced.items()} | {f"end_to_end_{k}": v for k, v in e2e.items()}
    stage2["train_label_balance"] = float(np.mean(data.y[data.train_rows].numpy() == 1))
    return TrainingReport(fidelity=fidelity, stage2=stage2, notes=[
        f"evaluated on {len(rows)} held-out rows (synthetic + coverage) phrased with the validation family; "
        "labels: synthetic labels, or the synthetic expert's argmax for coverage rows"])


def train_connectors(model, tokenizer, schema: TenantSchema | dict | str, *, model_id: str, model_hash: str,
                     config: ConnectorsConfig | None = None, progress: Progress | None = None,
                     resume: EncoderCheckpoint | None = None,
                     on_encoder: Callable[[EncoderCheckpoint], None] | None = None) -> TrainedConnectors:
    """The whole recipe for one layer k (``config.layer``) within ``config.time_budget_s``; ``resume`` /
    ``on_encoder`` carry a stage-1 checkpoint in and out (see :func:`fit_layer`)."""
    cfg = config or ConnectorsConfig()
    if not 0 <= cfg.layer < num_layers(model):
        raise ValueError(f"config.layer: {cfg.layer} is outside 0..{num_layers(model) - 1}; fix: pick a layer "
                         "of this model")
    start = time.perf_counter()
    budget = cfg.time_budget_s
    data = prepare_data(tokenizer, schema, cfg, progress)
    cache = cache_prompts(model, tokenizer, data, [cfg.layer], cfg, progress,
                          None if budget is None else start + BUDGET_SHARES.cache * budget)
    used = time.perf_counter() - start
    left = floor = None
    if budget is not None:
        floor = BUDGET_SHARES.fit_floor * budget
        left = max(budget - used, floor)
    trained = fit_layer(model, data, cache, cfg, model_id=model_id, model_hash=model_hash,
                        progress=progress, budget_s=left, resume=resume, on_encoder=on_encoder)
    if floor is not None and left == floor and trained.spec.training is not None:
        trained.spec.training.notes.append(
            f"{OVERRUN_NOTE}: preparing and caching took {used:.0f} s of the {budget:.0f} s budget; "
            f"training kept its floor of {floor:.0f} s (BUDGET_SHARES.fit_floor)")
    return trained
