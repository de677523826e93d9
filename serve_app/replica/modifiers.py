"""Per-row modifiers: one typed interface for everything that changes one row's forward pass.

A request is served by the base model plus zero or more :class:`RowModifier` objects built by the
replica: an :class:`AdapterModifier` (a tenant adapter, served from the pool's compressed bank) or
an :class:`ExpertModifier` (a Llamdex expert spliced in at layer k). Engines never have hooks
patched onto them; they state which modifier ``kind`` values they support
(``EngineCapabilities.modifiers``) and refuse the others.

The torch engine calls the interface at four points of a row's life:

1. :meth:`RowModifier.prompt_ids` — the row's prompt (an expert answers exactly the prompt its
   connectors were trained on) and :attr:`RowModifier.num_slots` extra positions appended to it;
2. :meth:`RowModifier.apply` (a classmethod) — once per forward for all rows of one kind at once,
   as vLLM's LoRA layers take one mapping per batch: it gets a :class:`ForwardBatch` and the
   per-row modifiers (None for rows without one) and returns a context manager active during the
   forward (bank indices, layer-k hooks);
3. :meth:`RowModifier.first_token` — may force the first generated token (an expert's answer) and
   attach a :class:`serve_app.wire.Prediction`;
4. modifiers are per request objects, so they may keep per-row state across chunked prefill.

The vLLM engine reads only :attr:`AdapterModifier.name` (it becomes a ``LoRARequest``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from serve_app.replica.expert_runtime import class_answer, expert_prompt_ids
from serve_app.wire import GenerationRequest, Prediction

ADAPTER = "adapter"
EXPERT = "expert"


@dataclass
class TorchRuntime:
    """What a modifier may use during a torch forward: the model, its tokenizer, the attached bank."""

    model: Any
    tokenizer: Any
    bank: Any = None
    """``compression.BankHandle`` or None."""
    bank_version: int | None = None


@dataclass(frozen=True)
class RowSpan:
    """One batch row of a forward: which positions of the row's sequence it carries."""

    start: int
    """Sequence position of the forward's first column for this row."""
    length: int
    """Real (non-padding) columns of this row."""
    prompt_len: int
    """Length of the row's prompt (its slots, if any, follow it)."""
    prompt_ids: Sequence[int]

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ForwardBatch:
    """One forward of the torch engine as modifiers see it. Prefill forwards carry the input
    embeddings ``[B, T, d]`` (modifiers may overwrite columns before the model runs)."""

    phase: Literal["prefill", "decode"]
    runtime: TorchRuntime
    spans: list[RowSpan]
    embeds: torch.Tensor | None = None


class ForcedToken(NamedTuple):
    """A first token chosen by a modifier instead of the sampler, and what it means."""

    token: int
    prediction: Prediction | None = None


class RowModifier(ABC):
    """Changes one row's forward pass; see the module docstring for when each method is called."""

    kind: ClassVar[str]

    @property
    def num_slots(self) -> int:
        """Extra positions appended after the prompt (filled by :meth:`apply`, never tokens)."""
        return 0

    def prompt_ids(self, tokenizer, request: GenerationRequest) -> list[int] | None:
        """The row's prompt, or None for the engine's default (chat template / raw prompt)."""
        return None

    def first_token(self, logits: torch.Tensor) -> ForcedToken | None:
        """Force the first generated token given the last prefill logits (V,), or None to sample."""
        return None

    @classmethod
    @abstractmethod
    def apply(cls, batch: ForwardBatch, rows: Sequence[RowModifier | None]) -> AbstractContextManager:
        """Context manager active during one forward; ``rows[i]`` is batch row i's modifier of this kind."""


def apply_all(batch: ForwardBatch, per_row: Sequence[Sequence[RowModifier]]) -> ExitStack:
    """Enter every modifier kind present in the batch (one ``apply`` per kind); returns the stack."""
    kinds: dict[type[RowModifier], list[RowModifier | None]] = {}
    for i, mods in enumerate(per_row):
        for m in mods:
            kinds.setdefault(type(m), [None] * len(per_row))[i] = m
    stack = ExitStack()
    try:
        for cls, rows in kinds.items():
            stack.enter_context(cls.apply(batch, rows))
    except BaseException:
        stack.close()
        raise
    return stack


# ---------------------------------------------------------------------------- bank adapters
class AdapterModifier(RowModifier):
    """The row uses tenant adapter ``name`` (``tenant/name``) from the engine's adapter store."""

    kind = ADAPTER

    def __init__(self, name: str):
        self.name = name
        self._index: tuple[int | None, int] | None = None  # (bank version, row in that bank)

    def __repr__(self) -> str:
        return f"AdapterModifier({self.name!r})"

    def index_in(self, runtime: TorchRuntime) -> int:
        """This adapter's row in the attached bank (cached per bank version)."""
        if self._index is None or self._index[0] != runtime.bank_version:
            self._index = (runtime.bank_version, runtime.bank.bank.index(self.name))
        return self._index[1]

    @classmethod
    def apply(cls, batch: ForwardBatch, rows: Sequence[RowModifier | None]) -> AbstractContextManager:
        bank = batch.runtime.bank
        if bank is None:
            raise RuntimeError("adapter rows need an attached bank (the engine checks this at admission)")
        return bank.using([-1 if m is None else m.index_in(batch.runtime) for m in rows])  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- Llamdex experts
@dataclass
class _ExpertState:
    states: list[torch.Tensor] = field(default_factory=list)
    """Layer-k input states of the prompt gathered chunk by chunk (chunked prefill)."""
    slots: torch.Tensor | None = None
    """decoder(expert(encoder(h_k))) (n, d), once the whole prompt has been seen."""


class ExpertModifier(RowModifier):
    """The row is answered by a Llamdex expert (``llamdex.insertion.Bundle``), as in training:

    the prompt is the connectors' system prompt + the question; n slots are appended; at layers
    < k they hold the decoder's placeholder; at the input of layer k they are overwritten by
    ``decoder(expert(encoder(h_k[prompt])))``; the first token is the class answer token with the
    highest probability at the last slot. Prefill may be chunked: the layer-k states of earlier
    chunks are kept until the chunk holding the slots arrives. Equal to
    ``llamdex.insertion.prefill_with_experts`` for a row alone (tested)."""

    kind = EXPERT

    def __init__(self, key: str, bundle):
        self.key, self.bundle = key, bundle
        self._state = _ExpertState()

    def __repr__(self) -> str:
        return f"ExpertModifier({self.key!r})"

    @property
    def num_slots(self) -> int:
        return self.bundle.spec.num_slots

    @property
    def layer(self) -> int:
        return self.bundle.spec.layer

    def prompt_ids(self, tokenizer, request: GenerationRequest) -> list[int]:
        return expert_prompt_ids(tokenizer, self.bundle, request)

    def first_token(self, logits: torch.Tensor) -> ForcedToken:
        prediction, token = class_answer(self.bundle, logits)
        return ForcedToken(token, Prediction(expert=self.key, **prediction))

    def _slot_vectors(self, runtime: TorchRuntime, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Run encoder → expert → decoder on the whole prompt's layer-k states (once per row)."""
        from causal_lm import backbone
        from llamdex.literals import layout, token_literals

        st = self._state
        hidden = torch.cat(st.states, dim=0)[None]  # (1, P, d)
        st.states = []
        mask = torch.ones(1, hidden.shape[1], dtype=torch.long)
        embeds = backbone(runtime.model).embed_tokens(torch.tensor([list(prompt_ids)]))
        literals = None
        if self.bundle.encoder.copies:
            lits = token_literals(runtime.tokenizer, list(prompt_ids))
            literals = layout([lits], self.bundle.encoder.cfg.vocabulary, hidden.shape[1], left=True)
        slots, _, _ = self.bundle.slots(hidden, mask, embeds, literals)
        return slots[0]

    def _overwrite(self, runtime: TorchRuntime, span: RowSpan, row: int, h: torch.Tensor) -> None:
        """At layer k's input: keep this chunk's prompt states; write the slot columns it holds."""
        st = self._state
        prompt_end = min(span.end, span.prompt_len)
        if span.start < prompt_end:
            st.states.append(h[row, : prompt_end - span.start].clone())
        if span.end > span.prompt_len:  # this chunk holds (some of) the slots
            if st.slots is None:
                st.slots = self._slot_vectors(runtime, span.prompt_ids)
            first = max(span.start, span.prompt_len)
            cols = slice(first - span.start, span.end - span.start)
            h[row, cols] = st.slots[first - span.prompt_len: span.end - span.prompt_len].to(h.dtype)

    @classmethod
    def apply(cls, batch: ForwardBatch, rows: Sequence[RowModifier | None]) -> AbstractContextManager:
        if batch.phase != "prefill":
            return nullcontext()
        return _expert_prefill(batch, rows)


@contextmanager
def _expert_prefill(batch: ForwardBatch, rows: Sequence[RowModifier | None]) -> Iterator[None]:
    from llamdex.llm_ops import overwrite_at_layer

    assert batch.embeds is not None
    experts: list[tuple[int, ExpertModifier]] = [(i, m) for i, m in enumerate(rows) if m is not None]  # type: ignore[misc]
    for i, m in experts:  # slot columns hold the decoder's placeholder below layer k
        span = batch.spans[i]
        first = max(span.start, span.prompt_len)
        if span.end > first:
            placeholder = m.bundle.decoder.placeholder[first - span.prompt_len: span.end - span.prompt_len]
            batch.embeds[i, first - span.start: span.end - span.start] = placeholder.to(batch.embeds.dtype)
    by_layer: dict[int, list[tuple[int, ExpertModifier]]] = {}
    for i, m in experts:
        by_layer.setdefault(m.layer, []).append((i, m))

    def hook_for(members: list[tuple[int, ExpertModifier]]):
        def fn(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            for i, m in members:
                m._overwrite(batch.runtime, batch.spans[i], i, h)
            return h
        return fn

    with ExitStack() as stack:
        for layer, members in by_layer.items():
            stack.enter_context(overwrite_at_layer(batch.runtime.model, layer, hook_for(members)))
        yield
