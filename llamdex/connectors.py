"""The two trained connectors around a frozen expert: encoder (LLM -> features), decoder (expert -> slots).

Encoder (deviation from the paper, documented): the paper decodes the layer-k hidden states to
text with the logit lens and fine-tunes RoBERTa-large (355M, bigger than SmolLM2-135M itself)
with one linear head per expert input column. On a 2-core CPU we instead let m learned feature
queries (one per schema feature) cross-attend over the layer-k hidden states of the prompt
positions (pads masked out, slots excluded), followed by a small MLP head per query. It trains in
about a minute on cached hidden states (the probe in the Llamdex notes) and reads meaning rather
than a lossy, shifted logit-lens string. Inputs are standardised per dimension with statistics of
the training cache (robust to the few huge "massive activation" dimensions of small LLMs).
Outputs are the codec's space directly, never raw units (avoids the paper's clamp dead zone):

* numeric  -> sigmoid in [0, 1] (min-max scaled value);
* category -> softmax over its K one-hot columns plus one extra "not stated" logit that is
  dropped, so an unmentioned (missing) value comes out as the codec's all-zero block;
* bool     -> sigmoid.

Decoder (as in the paper, one deviation): SwiGLU c -> F -> n*d, reshaped to n vectors, then a
LayerNorm without affine parameters, times ``scale``. The paper's SwiGLU has no biases at all, so
dec(0) = 0: a confident binary expert (P(yes) ~ 0) yields near-zero vectors that LayerNorm cannot
rescale (eps dominates) and "no" can only be signalled by absence. We give the two input
projections biases (W3 stays bias-free) so every expert output maps to a proper vector. ``scale = 1`` is the paper's plain
LayerNorm (per-element RMS 1); ``norm = "residual_rms"`` sets ``scale`` to the measured median
RMS of the residual stream at layer k, so injected slots look like real tokens to later layers.
The decoder also owns ``placeholder``: what the n slots hold at layers < k (see insertion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from llamdex.codec import FeatureCodec
from llamdex.literals import KINDS, NUMBER, YES, LiteralBatch

FeatureKind = Literal["numeric", "category", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureHead(_Strict):
    """One encoder head: the feature it predicts and how many codec columns it fills."""

    name: str
    kind: FeatureKind
    width: int = Field(ge=1)
    lo: float | None = None  # numeric range (schema), used to scale a copied literal into [0, 1]
    hi: float | None = None


class EncoderConfig(_Strict):
    """Encoder hyper-parameters (defaults: 256-wide, 8 heads, 1 cross-attention block)."""

    hidden_size: int = Field(ge=1)
    features: list[FeatureHead] = Field(min_length=1)
    width: int = Field(default=256, ge=8)
    heads: int = Field(default=8, ge=1)
    layers: int = Field(default=1, ge=1, le=4)
    head_hidden: int = Field(default=128, ge=1)
    self_layers: int = Field(default=0, ge=0, le=6)
    """Bidirectional self-attention layers over the prompt memory before the feature queries read it."""
    token_inputs: bool = False
    """Also read the prompt's token embeddings (the LLM's layer-0 states: exact token identities)."""
    positions: bool = False
    """Add sinusoidal positions (counted over real tokens, so left/right padding does not matter)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    conv_layers: int = Field(default=0, ge=0, le=6)
    """Residual depthwise-convolution blocks over the memory: each token sees +-(kernel//2) neighbours
    on *both* sides at fixed relative offsets (a causal LM's state at a value cannot see the label
    written after it, as in "861 is the figure given for balance")."""
    conv_kernel: int = Field(default=9, ge=3, le=31)
    anchor: bool = False
    """Copied features also locate their own label (attention trained on where the label is written)
    and add a learned bias by signed token distance from it to the pointer's scores."""
    anchor_reach: int = Field(default=24, ge=1, le=256)
    copy_literals: bool = False
    """Numeric and bool features point at a literal of the prompt and copy its exact value
    (:mod:`llamdex.literals`); the regression heads remain the fallback when a prompt has none."""

    @model_validator(mode="after")
    def _copy_needs_ranges(self) -> EncoderConfig:
        if self.copy_literals and any(f.kind == "numeric" and (f.lo is None or f.hi is None) for f in self.features):
            raise ValueError("features: copy_literals needs lo/hi on every numeric feature; fix: build the heads "
                             "with feature_heads(codec)")
        return self


class DecoderConfig(_Strict):
    """Decoder hyper-parameters: expert output size c, slots n of size d, SwiGLU width F."""

    input_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_slots: int = Field(default=10, ge=1, le=64)
    ffn_hidden: int = Field(default=512, ge=1)
    norm: Literal["layernorm", "residual_rms"] = "residual_rms"
    scale: float = Field(default=1.0, gt=0)


def feature_heads(codec: FeatureCodec) -> list[FeatureHead]:
    """One head per schema feature, in codec order (so concatenated outputs = codec columns)."""
    kinds = {"int": "numeric", "float": "numeric", "category": "category", "bool": "bool"}
    return [FeatureHead(name=f.name, kind=kinds[f.type], width=codec.slices[f.name].stop - codec.slices[f.name].start,
                        lo=f.lo if f.range else None, hi=f.hi if f.range else None)
            for f in codec.features]


@dataclass
class EncoderRaw:
    """Raw encoder outputs: one head output per feature ((B, 1) or (B, K+1)) and, when copying,
    pointer logits (B, F_copy, T) over the prompt's literal tokens with their candidate mask."""

    heads: list[torch.Tensor]
    pointer_logits: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    literals: LiteralBatch | None = None
    anchor_logits: torch.Tensor | None = None  # (B, F_copy, T): where each copied feature's label is


class _CrossBlock(nn.Module):
    """Pre-norm block: queries attend over the (masked) prompt memory, then a small MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_m = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, q: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), memory, memory, key_padding_mask=pad, need_weights=False)[0]
        return q + self.mlp(self.norm_m(q))


class _ConvBlock(nn.Module):
    """Pre-norm residual block: depthwise conv along the sequence (padding masked to zero), GELU, pointwise."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.pointwise = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * keep[..., None]
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return x + self.pointwise(F.gelu(h)) * keep[..., None]


def sinusoid(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Transformer sinusoidal encodings (…, width) of integer ``positions`` (…)."""
    half = width // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freq
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(out, (0, width - 2 * half))


class Encoder(nn.Module):
    """Layer-k hidden states of the prompt (B, T, d) + mask (B, T) [+ token embeddings (B, T, d)]
    [+ literal channels] -> expert input (B, m) in codec space.

    Memory = LayerNorm(proj(standardised h_k) [+ proj(token embeddings)] [+ positions] [+ literal
    kind embedding]), optionally contextualised by ``self_layers`` bidirectional layers (a causal
    LM's state at "zero" cannot know that "... is the figure given for parents" follows); then one
    learned query per feature cross-attends over it and a small MLP head per feature reads the
    result. With ``copy_literals`` each numeric/bool query also scores the prompt's literal tokens
    (pointer attention) and the feature takes the exact value of the best one.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d, w = cfg.hidden_size, cfg.width
        self.register_buffer("in_mean", torch.zeros(d))
        self.register_buffer("in_std", torch.ones(d))
        self.proj = nn.Linear(d, w)
        self.token_proj = nn.Linear(d, w) if cfg.token_inputs else None
        self.norm = nn.LayerNorm(w)
        self.context = nn.ModuleList(
            nn.TransformerEncoderLayer(w, cfg.heads, 2 * w, dropout=cfg.dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.self_layers))
        self.convs = nn.ModuleList(_ConvBlock(w, cfg.conv_kernel) for _ in range(cfg.conv_layers))
        self.queries = nn.Parameter(torch.randn(len(cfg.features), w) * 0.5)
        self.blocks = nn.ModuleList(_CrossBlock(w, cfg.heads) for _ in range(cfg.layers))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.head_hidden), nn.GELU(),
                          nn.Linear(cfg.head_hidden, f.width + 1 if f.kind == "category" else 1))
            for f in cfg.features)
        self.copied = [i for i, f in enumerate(cfg.features) if cfg.copy_literals and f.kind != "category"]
        if self.copied:
            self.kind_embed = nn.Embedding(KINDS, w)
            self.magnitude = nn.Linear(2, w)  # sign and log-magnitude of a number literal
            if cfg.anchor:
                self.anchor_query = nn.Linear(w, w)
                self.anchor_key = nn.Linear(w, w)
                self.distance_bias = nn.Parameter(torch.zeros(2 * cfg.anchor_reach + 3))
            self.pointer_query = nn.Linear(w, w)
            self.pointer_key = nn.Linear(w, w)

    @torch.no_grad()
    def fit_input_stats(self, hidden: list[torch.Tensor]) -> None:
        """Set the per-dimension standardisation from a list of (T_i, d) training hidden states."""
        flat = torch.cat([h.float() for h in hidden])
        self.in_mean.copy_(flat.mean(0))
        self.in_std.copy_(flat.std(0).clamp_min(1e-4))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None,
                literals: LiteralBatch | None = None) -> EncoderRaw:
        """Raw outputs (use :meth:`activate`); ``literals`` are needed when the encoder copies."""
        x = self.proj((hidden.float() - self.in_mean) / self.in_std)
        if self.token_proj is not None:
            if embeds is None:
                raise ValueError("embeds: these connectors read token embeddings too; fix: pass the prompt's "
                                 "input embeddings (the LLM's embed_tokens of its ids)")
            x = x + self.token_proj(embeds.float())
        if self.cfg.positions:
            x = x + sinusoid((mask.long().cumsum(-1) - 1).clamp(min=0), x.shape[-1])
        if self.copied:
            if literals is None:
                raise ValueError("literals: these connectors copy literals from the prompt; fix: pass the "
                                 "prompt's llamdex.literals channels (left_padded / right_padded)")
            is_number = (literals.kinds == NUMBER).float()[..., None]
            v = literals.values.float()[..., None]
            x = x + self.kind_embed(literals.kinds) + is_number * self.magnitude(
                torch.cat([torch.sign(v), torch.log10(1 + v.abs()) / 3], dim=-1))
        memory = self.norm(x)
        pad = ~mask.bool()
        for block in self.convs:
            memory = block(memory, mask.float())
        for layer in self.context:
            memory = layer(memory, src_key_padding_mask=pad)
        q = self.queries[None].expand(hidden.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, memory, pad)
        raw = EncoderRaw([head(q[:, i]) for i, head in enumerate(self.heads)])
        if self.copied:
            assert literals is not None
            queries = self.pointer_query(q[:, self.copied])  # (B, F_copy, w)
            logits = torch.einsum("bfw,btw->bft", queries, self.pointer_key(memory)) / math.sqrt(queries.shape[-1])
            kinds = literals.kinds[:, None, :]
            numeric = torch.tensor([self.cfg.features[i].kind == "numeric" for i in self.copied])[None, :, None]
            candidates = torch.where(numeric, kinds == NUMBER, kinds >= YES) & mask.bool()[:, None, :]
            if self.cfg.anchor:
                scale = math.sqrt(queries.shape[-1])
                anchor = torch.einsum("bfw,btw->bft", self.anchor_query(q[:, self.copied]), self.anchor_key(memory))
                raw.anchor_logits = (anchor / scale).masked_fill(pad[:, None, :], -1e4)
                logits = logits + torch.softmax(raw.anchor_logits, -1) @ self._distance_kernel(mask.shape[1])
            raw.pointer_logits = logits.masked_fill(~candidates, -1e4)
            raw.candidates, raw.literals = candidates, literals
        return raw

    def _distance_kernel(self, width: int) -> torch.Tensor:
        """(T, T) learned bias for a literal at t given the label at s, by signed distance t - s (clipped)."""
        reach = self.cfg.anchor_reach
        pos = torch.arange(width)
        bucket = (pos[None, :] - pos[:, None]).clamp(-reach - 1, reach + 1) + reach + 1
        return self.distance_bias[bucket]

    def activate(self, raw: EncoderRaw) -> torch.Tensor:
        """Raw outputs -> (B, m) expert input: sigmoid numerics/bools, softmax categories (missing dropped);
        copied features take the best-scoring literal's value (scaled to the range; yes -> 1, no -> 0)."""
        parts = [torch.softmax(r, dim=-1)[:, :-1] if f.kind == "category" else torch.sigmoid(r)
                 for f, r in zip(self.cfg.features, raw.heads, strict=True)]
        if raw.pointer_logits is not None:
            assert raw.candidates is not None and raw.literals is not None
            best = raw.pointer_logits.argmax(-1)  # (B, F_copy)
            for j, i in enumerate(self.copied):
                f, pick = self.cfg.features[i], best[:, j:j + 1]
                if f.kind == "numeric":
                    assert f.lo is not None and f.hi is not None
                    value = ((raw.literals.values.gather(1, pick) - f.lo) / (f.hi - f.lo)).clamp(0, 1)
                else:
                    value = (raw.literals.kinds.gather(1, pick) == YES).double()
                has = raw.candidates[:, j].any(-1, keepdim=True)
                parts[i] = torch.where(has, value.to(parts[i].dtype), parts[i])
        return torch.cat(parts, dim=1)

    def features(self, hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None,
                 literals: LiteralBatch | None = None) -> torch.Tensor:
        """Expert input (B, m) in codec space."""
        return self.activate(self(hidden, mask, embeds, literals))

    def loss(self, raw: EncoderRaw, target: torch.Tensor, numeric_weight: float = 1.0,
             pointer_targets: torch.Tensor | None = None, anchor_targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over features of MSE (numeric, scaled [0,1], times ``numeric_weight``), CE (category,
        all-zero target = the extra 'not stated' class) and BCE (bool); with ``pointer_targets``
        (B, F_copy, T) bool -- the tokens of each copied feature's written value -- also the pointer's
        negative log-likelihood of landing on them (``<name>@copy``); with ``anchor_targets`` (the tokens of
        each copied feature's label) the same for the label finder (``<name>@anchor``). Also returns
        per-feature values."""
        losses: dict[str, torch.Tensor] = {}
        col = 0
        for f, r in zip(self.cfg.features, raw.heads, strict=True):
            t = target[:, col:col + f.width]
            col += f.width
            if f.kind == "numeric":
                losses[f.name] = numeric_weight * F.mse_loss(torch.sigmoid(r), t)
            elif f.kind == "bool":
                losses[f.name] = F.binary_cross_entropy_with_logits(r, t)
            else:
                labels = torch.where(t.sum(1) > 0.5, t.argmax(1), torch.full_like(t[:, 0], f.width, dtype=torch.long))
                losses[f.name] = F.cross_entropy(r, labels)
        for tag, logits, targets in (("copy", raw.pointer_logits, pointer_targets),
                                     ("anchor", raw.anchor_logits, anchor_targets)):
            if targets is None or logits is None:
                continue
            hit = torch.logsumexp(logits.float().masked_fill(~targets, -1e4), -1)
            nll = torch.logsumexp(logits.float(), -1) - hit  # (B, F_copy)
            known = targets.any(-1)
            for j, i in enumerate(self.copied):
                if bool(known[:, j].any()):
                    losses[f"{self.cfg.features[i].name}@{tag}"] = nll[known[:, j], j].mean()
        total = torch.stack(list(losses.values())).mean()
        return total, {k: float(v.detach()) for k, v in losses.items()}


class Decoder(nn.Module):
    """Expert output (B, c) -> n slot vectors (B, n, d): SwiGLU (input biases only), LayerNorm, times ``scale``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.w1 = nn.Linear(cfg.input_size, cfg.ffn_hidden)
        self.w2 = nn.Linear(cfg.input_size, cfg.ffn_hidden)
        self.w3 = nn.Linear(cfg.ffn_hidden, cfg.num_slots * cfg.hidden_size, bias=False)
        self.register_buffer("placeholder", torch.zeros(cfg.num_slots, cfg.hidden_size))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        y = self.w3(F.silu(self.w1(p)) * self.w2(p)).view(p.shape[0], self.cfg.num_slots, self.cfg.hidden_size)
        return F.layer_norm(y, (self.cfg.hidden_size,)) * self.cfg.scale


def gaussian_placeholder(embedding: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Fixed N(0, s^2) slot inputs (n, d), s = RMS of the embedding table: the paper's Gaussian pads,
    but drawn once (seeded) so insertion and generation are deterministic, at token-embedding scale."""
    gen = torch.Generator().manual_seed(seed)
    scale = embedding.detach().float().pow(2).mean().sqrt()
    return torch.randn(n, embedding.shape[1], generator=gen) * scale
