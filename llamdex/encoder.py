"""The encoder connector: the LLM's layer-k hidden states of a prompt -> the expert's input features.

Deviation from the paper (documented in docs/llamdex.md): the paper decodes the layer-k hidden
states to text with the logit lens and fine-tunes RoBERTa-large (355M, bigger than SmolLM2-135M
itself) with one linear head per expert input column. On a 2-core CPU we instead let one learned
query per schema feature cross-attend over the layer-k hidden states of the prompt positions
(pads masked out, slots excluded). Inputs are standardised per dimension with statistics of the
training cache (robust to the few huge "massive activation" dimensions of small LLMs).

**Copying values** (``copy_literals``, the default): a small LLM's state at the last digit of
"0.045" does not hold the number exactly, and regressing values from it read wine's decimals and
bank's counts worse than predicting the mean. So each feature *points* at a token of the prompt
and copies what is written there (:mod:`llamdex.literals`), like pointer-generator networks:

* numeric  -> a number literal (digits, number words, "no"/"none" = 0, "a"/"an" = 1) or a mention
  of one of its special-value phrases ("never contacted before" = -1); the exact value, min-max scaled;
* bool     -> a yes/no word, a negation, "no", or a mention of its true/false phrases or of its own
  label (true unless negated: "they have a housing loan"); 1 or 0;
* category -> a mention of one of its categories (name, synonym, ordinal/number form); its one-hot;

and every feature may point at a learned **"not stated"** option instead: a category is then all
zeros (missing), a numeric or bool feature gets the schema's ``default`` (``fill``), and the
prediction reports the feature as not stated -- never a value made up from the hidden states.

The pointer is trained on where the grammar wrote each value. Two inductive biases help it bind a
value to the right label when the phrasing is new: ``conv_layers`` residual depthwise convolutions
give every token a window on *both* sides (a causal LM's state at "861" in "861 is the figure
given for balance" cannot see the label that follows), and ``anchor`` lets each feature also find
its own label (trained on where the label is written) and adds a learned bias by signed token
distance from it. The regression/classification heads below are kept as an auxiliary loss and as
an ablation (``copy_literals=False``).

Without copying, outputs come from the heads, in the codec's [0, 1] space (never raw units, which
avoids the paper's clamp dead zone): numeric -> sigmoid; category -> softmax over its K columns
plus a dropped "not stated" logit; bool -> sigmoid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from causal_lm import position_ids
from llamdex.codec import FeatureCodec
from llamdex.literals import KINDS, YES, LiteralBatch, candidates
from llamdex.vocabulary import phrase_values, value_phrases

FeatureKind = Literal["numeric", "category", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureHead(_Strict):
    """One encoder output: the feature, its kind, how many codec columns it fills, and what copying
    needs to know: the numeric range, the category names, the phrases of each value (categories,
    bool false/true, numeric special values with ``phrase_values``) and the codec-space ``fill`` used
    when the feature is not stated (numeric/bool: the schema's default)."""

    name: str
    kind: FeatureKind
    width: int = Field(ge=1)
    lo: float | None = None
    hi: float | None = None
    categories: list[str] | None = None
    phrases: list[list[str]] = Field(default_factory=list)
    phrase_values: list[float] = Field(default_factory=list)
    fill: float = 0.0


class EncoderConfig(_Strict):
    """Encoder hyper-parameters (see the module docstring for the options)."""

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
    conv_kernel: int = Field(default=9, ge=3, le=31)
    anchor: bool = False
    anchor_reach: int = Field(default=24, ge=1, le=256)
    copy_literals: bool = False

    @model_validator(mode="after")
    def _copy_needs_layout(self) -> EncoderConfig:
        if self.copy_literals and any((f.kind == "numeric" and (f.lo is None or f.hi is None))
                                      or (f.kind == "category" and f.categories is None) for f in self.features):
            raise ValueError("features: copy_literals needs lo/hi on numeric and categories on category features; "
                             "fix: build the heads with feature_heads(codec)")
        return self

    @property
    def vocabulary(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
        """Per feature, per value, its phrases (for :meth:`llamdex.literals.PromptLiterals.mentions`)."""
        return tuple(tuple(tuple(p) for p in f.phrases) for f in self.features)


def _fill(f) -> float:
    """Codec-space value of a feature the question does not state: the schema default (numeric scaled
    to [0, 1], bool 0/1), else the range's middle / false."""
    if f.type == "bool":
        return 1.0 if f.default is True else 0.0
    if f.type in ("int", "float"):
        return 0.5 if f.default is None else min(1.0, max(0.0, (float(f.default) - f.lo) / (f.hi - f.lo)))
    return 0.0


def feature_heads(codec: FeatureCodec) -> list[FeatureHead]:
    """One head per schema feature, in codec order (so concatenated outputs = codec columns)."""
    kinds = {"int": "numeric", "float": "numeric", "category": "category", "bool": "bool"}
    return [FeatureHead(name=f.name, kind=kinds[f.type], width=codec.slices[f.name].stop - codec.slices[f.name].start,
                        lo=f.lo if f.range else None, hi=f.hi if f.range else None,
                        categories=list(f.categories) if f.categories else None, phrases=value_phrases(f),
                        phrase_values=phrase_values(f), fill=_fill(f))
            for f in codec.features]


def assign_distinct(mass: torch.Tensor, floor: float = 0.01) -> dict[int, int]:
    """Rows (features) -> distinct columns (tokens) maximising the summed log of ``mass`` (F, T), over
    pairs holding more than ``floor``; rows without such a pair are left out of the result."""
    cols = torch.nonzero((mass > floor).any(0)).flatten()
    if len(cols) == 0:
        return {}
    sub = mass[:, cols].double()
    rows, picked = linear_sum_assignment((-torch.log(sub.clamp_min(1e-12))).numpy())
    return {int(i): int(cols[c]) for i, c in zip(rows.tolist(), picked.tolist(), strict=True) if float(sub[i, c]) > floor}


@dataclass
class EncoderRaw:
    """Raw encoder outputs: one head output per feature ((B, 1) or (B, K+1)) and, when copying,
    pointer logits (B, F, T+1) over the prompt's tokens plus "not stated", their candidate mask,
    the literals they index and the label finder's logits (B, F, T)."""

    heads: list[torch.Tensor]
    pointer_logits: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    literals: LiteralBatch | None = None
    anchor_logits: torch.Tensor | None = None


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
    """Pre-norm residual block: depthwise conv along the sequence (padding kept at zero), GELU, pointwise."""

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
    [+ the prompt's literals] -> expert input (B, m) in codec space (see the module docstring)."""

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
        if cfg.copy_literals:
            self.kind_embed = nn.Embedding(KINDS, w)
            self.pointer_query = nn.Linear(w, w)
            self.pointer_key = nn.Linear(w, w)
            self.not_stated = nn.Linear(w, 1)
            if cfg.anchor:
                self.anchor_query = nn.Linear(w, w)
                self.anchor_key = nn.Linear(w, w)
                self.distance_bias = nn.Parameter(torch.zeros(2 * cfg.anchor_reach + 3))

    @property
    def copies(self) -> bool:
        """True when features are copied from the prompt (callers must pass its literals)."""
        return self.cfg.copy_literals

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
            x = x + sinusoid(position_ids(mask.long()), x.shape[-1])
        if self.copies:
            if literals is None:
                raise ValueError("literals: these connectors copy values from the prompt; fix: pass the "
                                 "prompt's llamdex.literals channels (literals.layout)")
            # the kind only: a value's size would teach the synthetic rows' value distribution, which
            # real values do not follow (measured: real bank balances were copied from pdays' "-1")
            x = x + self.kind_embed(literals.kinds)
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
        if self.copies:
            assert literals is not None
            self._point(raw, q, memory, mask, literals)
        return raw

    def _point(self, raw: EncoderRaw, q: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
               literals: LiteralBatch) -> None:
        """Fill the pointer fields of ``raw``: scores (B, F, T+1) over the tokens and "not stated"."""
        scale = math.sqrt(memory.shape[-1])
        logits = torch.einsum("bfw,btw->bft", self.pointer_query(q), self.pointer_key(memory)) / scale
        if self.cfg.anchor:
            anchor = torch.einsum("bfw,btw->bft", self.anchor_query(q), self.anchor_key(memory)) / scale
            raw.anchor_logits = anchor.masked_fill(~mask.bool()[:, None, :], -1e4)
            logits = logits + torch.softmax(raw.anchor_logits, -1) @ self._distance_kernel(mask.shape[1])
        allowed = candidates(literals.kinds, literals.mentions, [f.kind for f in self.cfg.features])
        allowed &= mask.bool()[:, None, :]
        not_stated = torch.ones(q.shape[0], len(self.cfg.features), 1, dtype=torch.bool)
        raw.candidates = torch.cat([allowed, not_stated], -1)
        raw.pointer_logits = torch.cat([logits, self.not_stated(q)], -1).masked_fill(~raw.candidates, -1e4)
        raw.literals = literals

    def _distance_kernel(self, width: int) -> torch.Tensor:
        """(T, T) learned bias for a value at t given the label at s, by signed distance t - s (clipped)."""
        reach = self.cfg.anchor_reach
        pos = torch.arange(width)
        bucket = (pos[None, :] - pos[:, None]).clamp(-reach - 1, reach + 1) + reach + 1
        return self.distance_bias[bucket]

    def activate(self, raw: EncoderRaw) -> torch.Tensor:
        """Raw outputs -> (B, m) expert input. Heads: sigmoid numerics/bools, softmax categories
        ("not stated" dropped). Copying: the pointed token's value (scaled numeric; yes -> 1, no -> 0;
        a mention's value; one-hot of the mentioned category) or, for "not stated", the feature's fill
        (categories: zeros)."""
        parts = [torch.softmax(r, dim=-1)[:, :-1] if f.kind == "category" else torch.sigmoid(r)
                 for f, r in zip(self.cfg.features, raw.heads, strict=True)]
        if raw.pointer_logits is None:
            return torch.cat(parts, dim=1)
        assert raw.candidates is not None and raw.literals is not None
        lits = raw.literals
        width = lits.kinds.shape[1]
        best = self._one_each(raw)  # (B, F) pointed token, or `width` for "not stated"
        token = best.clamp(max=width - 1)
        stated = best < width
        for i, f in enumerate(self.cfg.features):
            pick = token[:, i:i + 1]
            which = lits.mentions[:, i].gather(1, pick)[:, 0]  # the mentioned value, or -1
            if f.kind == "numeric":
                assert f.lo is not None and f.hi is not None
                said = lits.values.gather(1, pick)[:, 0]
                if f.phrase_values:
                    table = torch.tensor(f.phrase_values, dtype=said.dtype)
                    said = torch.where(which >= 0, table[which.clamp(min=0)], said)
                value = ((said - f.lo) / (f.hi - f.lo)).clamp(0, 1)[:, None]
            elif f.kind == "bool":
                said = torch.where(which >= 0, which.double(), (lits.kinds.gather(1, pick)[:, 0] == YES).double())
                value = said[:, None]
            else:
                value = F.one_hot(which.clamp(min=0), f.width).double() * (stated[:, i] & (which >= 0))[:, None]
            if f.kind != "category":
                value = torch.where(stated[:, i:i + 1], value, torch.full_like(value, f.fill))
            parts[i] = value.to(parts[i].dtype)
        return torch.cat(parts, dim=1)

    def stated(self, raw: EncoderRaw) -> torch.Tensor:
        """(B, F) bool: which features the question states (the pointer did not pick "not stated");
        all True for encoders that do not copy."""
        if raw.pointer_logits is None or raw.literals is None:
            return torch.ones(raw.heads[0].shape[0], len(self.cfg.features), dtype=torch.bool)
        return self._one_each(raw) < raw.literals.kinds.shape[1]

    def _one_each(self, raw: EncoderRaw) -> torch.Tensor:
        """Each feature's choice (B, F): the first token of the literal or mention it reads, or ``T`` for
        "not stated".

        Probabilities are summed over the tokens of one literal ("thirty-six" is three tokens, and its
        mass would otherwise be split three ways against the single "not stated" option). A feature is
        stated when its candidates hold more than half of its mass, and reads the literal or mention
        holding the most. One numeric/bool feature per literal: the pointers' joint choice is the most
        probable assignment of features to distinct literals (maximum summed log-mass, Hungarian
        algorithm), not a greedy one: when two features both lean towards one literal, a greedy pass
        lets the more confident keep it and sends the other to whatever it half-wanted next (often a
        third field's value), while the joint choice gives each feature a literal it points at. Only
        pairs holding more than 1 % of a feature's mass take part; a feature left without one keeps
        its own choice. Mentions of a feature's own values (two features may both read "never
        contacted before") and categories are exempt."""
        assert raw.pointer_logits is not None and raw.literals is not None and raw.candidates is not None
        lits = raw.literals
        b, f, t = raw.pointer_logits.shape[0], raw.pointer_logits.shape[1], lits.kinds.shape[1]
        probs = torch.softmax(raw.pointer_logits.float(), -1)
        stated = probs[..., t] < 0.5
        # groups: runs of tokens with the same kind, value and (per feature) mention of the same value
        kinds = lits.kinds[:, None, :].expand(b, f, t)
        values = lits.values[:, None, :].expand(b, f, t)
        change = torch.ones(b, f, t, dtype=torch.bool)
        change[..., 1:] = ((kinds[..., 1:] != kinds[..., :-1]) | (values[..., 1:] != values[..., :-1])
                           | (lits.mentions[..., 1:] != lits.mentions[..., :-1]))
        pos = torch.arange(t).expand(b, f, t)
        starts = torch.where(change, pos, torch.zeros_like(pos)).cummax(-1).values
        mass = torch.zeros(b, f, t).scatter_add_(2, starts, probs[..., :t])
        best = torch.where(stated, mass.argmax(-1), torch.full((b, f), t))
        shared = [i for i, feat in enumerate(self.cfg.features) if feat.kind != "category"]
        if len(shared) < 2:
            return best
        own = lits.mentions.gather(2, best.clamp(max=t - 1)[..., None])[..., 0] >= 0
        literal = (lits.kinds != 0).float()[:, None, :]  # only kind literals are shared
        for r in range(b):
            keep = [i for i in shared if bool(stated[r, i]) and not bool(own[r, i])]
            if len(keep) >= 2:
                for i, tok in assign_distinct(mass[r, keep] * literal[r]).items():
                    best[r, keep[i]] = tok
        return best

    def features(self, hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None,
                 literals: LiteralBatch | None = None) -> torch.Tensor:
        """Expert input (B, m) in codec space."""
        return self.activate(self(hidden, mask, embeds, literals))

    def loss(self, raw: EncoderRaw, target: torch.Tensor, numeric_weight: float = 1.0,
             pointer_targets: torch.Tensor | None = None, anchor_targets: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean over features of the heads' losses -- MSE (numeric, scaled [0,1], times ``numeric_weight``),
        CE (category, all-zero target = the extra 'not stated' class), BCE (bool) -- and, when given, the
        pointer's negative log-likelihood of landing on ``pointer_targets`` (B, F, T+1), where each value
        is written or "not stated" (``<name>@copy``), and the label finder's on ``anchor_targets``
        (B, F, T), where each label is written (``<name>@anchor``). Also returns per-term values."""
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
            if tag == "copy":
                assert raw.candidates is not None
                targets = targets & raw.candidates
            hit = torch.logsumexp(logits.float().masked_fill(~targets, -1e4), -1)
            nll = torch.logsumexp(logits.float(), -1) - hit  # (B, F)
            known = targets.any(-1)
            for i, f in enumerate(self.cfg.features):
                if bool(known[:, i].any()):
                    losses[f"{f.name}@{tag}"] = nll[known[:, i], i].mean()
        total = torch.stack(list(losses.values())).mean()
        return total, {k: float(v.detach()) for k, v in losses.items()}
