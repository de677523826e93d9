"""The decoder connector (expert output -> slot vectors); the encoder lives in :mod:`llamdex.encoder`.

(Same idea at two layers: this is the connectors' science; ``train_jobs.connectors`` is the Ray job
that trains them for tenants and publishes them.)

Decoder (as in the paper, one deviation): SwiGLU c -> F -> n*d, reshaped to n vectors, then a
LayerNorm without affine parameters, times ``scale``. The paper's SwiGLU has no biases at all, so
dec(0) = 0: a confident binary expert (P(yes) ~ 0) yields near-zero vectors that LayerNorm cannot
rescale (eps dominates) and "no" can only be signalled by absence. We give the two input
projections biases (W3 stays bias-free) so every expert output maps to a proper vector. ``scale = 1`` is the paper's plain
LayerNorm (per-element RMS 1); ``norm = "residual_rms"`` sets ``scale`` to the measured median
RMS of the residual stream at layer k, so injected slots look like real tokens to later layers.
The decoder also owns ``placeholder``: what the n slots hold at layers < k (see insertion).

Second deviation, ``sharpen`` (a temperature T <= 1 on the expert's class distribution, applied before
the SwiGLU; T = 1 is the paper): the LLM is trained to transmit the *sharpened* expert, so a
near-tied expert ([0.45, 0.55]) reaches the LLM as a clear choice ([0.31, 0.69] at T = 0.25) and its
argmax survives the decoding. Chat needs the expert's argmax; predict returns the expert's own
probabilities, untouched. Chosen on validation rows (``bench/llamdex_decoders.py``): the LLM's answer
agrees with the expert on true features on 85.7 % of wine's validation rows at T = 1 and 99.0 % at
T = 0.2 (near ties: 65 % -> 94 %); titanic 97.9 % -> 99.3 %. ``DecoderConfig`` keeps 1 as its
default so connectors saved before this field read as before; training uses ``dec_sharpen``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecoderConfig(_Strict):
    """Decoder hyper-parameters: expert output size c, slots n of size d, SwiGLU width F."""

    input_size: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_slots: int = Field(default=10, ge=1, le=64)
    ffn_hidden: int = Field(default=512, ge=1)
    norm: Literal["layernorm", "residual_rms"] = "residual_rms"
    scale: float = Field(default=1.0, gt=0)
    sharpen: float = Field(default=1.0, gt=0, le=1)  # temperature on the expert's distribution (1 = paper)


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
        p = sharpen(p, self.cfg.sharpen)
        y = self.w3(F.silu(self.w1(p)) * self.w2(p)).view(p.shape[0], self.cfg.num_slots, self.cfg.hidden_size)
        return F.layer_norm(y, (self.cfg.hidden_size,)) * self.cfg.scale


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Expert output (B, c) at ``temperature``: binary P(yes) (c = 1) or a class distribution (c = K),
    same shape, ordering kept, gaps widened for T < 1 (T = 1 returns ``p`` itself)."""
    if temperature == 1.0:
        return p
    if p.shape[1] == 1:
        return torch.sigmoid(torch.logit(p.clamp(1e-6, 1 - 1e-6)) / temperature)
    return torch.softmax(p.clamp_min(1e-12).log() / temperature, dim=1)


def gaussian_placeholder(embedding: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Fixed N(0, s^2) slot inputs (n, d), s = RMS of the embedding table: the paper's Gaussian pads,
    but drawn once (seeded) so insertion and generation are deterministic, at token-embedding scale."""
    gen = torch.Generator().manual_seed(seed)
    scale = embedding.detach().float().pow(2).mean().sqrt()
    return torch.randn(n, embedding.shape[1], generator=gen) * scale
