"""Llamdex experts inside vLLM: a Llama whose layer-k input at an expert request's slots is
``decoder(expert(encoder(h_k[prompt])))``, all computed in vLLM's own forward pass.

How a request reaches it (the engine side is :mod:`serve_app.vllm_plugin.expert_host`):

* the prompt is the connectors' training prompt; its multimodal data is one ``image`` item (vLLM
  rejects new modality names) holding ``atelier_expert`` (the worker's slot id of a bundle loaded
  by ``atelier_expert_load``), ``atelier_slots`` (n) and ``atelier_nonce`` (a request number);
* :class:`LlamdexProcessor` appends n placeholder tokens after the prompt
  (``PromptInsertion`` at the end); :meth:`LlamdexForCausalLM.embed_multimodal` returns, per slot,
  the decoder's fixed placeholder vector plus the ids in 0/1 bits (exact in every dtype), and
  :meth:`LlamdexForCausalLM.embed_input_ids` writes the placeholders (what slots hold below
  layer k, as in training) and keeps the ids for the forward;
* :meth:`LlamdexLlamaModel.forward` runs the decoder layers; at the input of layer k (the
  bundle's layer; HF ``hidden_states[k]`` = vLLM's ``hidden + residual``) it reads the prompt's
  states, which precede the slots in the same forward, runs encoder → expert → decoder and
  overwrites the slots' residual stream. Later tokens attend to the slots through vLLM's KV cache.

The prompt must be in the same forward as its slots: engines serving experts run with chunked
prefill off, and each expert request carries its own ``cache_salt`` so no prefix-cache hit skips
prompt tokens (:func:`engine_kwargs_for_experts`). The forward has data-dependent Python, so the
model is never compiled (``ignore_torch_compile``, ``enforce_eager``). The encoder's features per
request are kept for the engine (``atelier_expert_results``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import DictEmbeddingItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptIndexTargets,
    PromptInsertion,
    PromptUpdate,
)

ARCHITECTURE = "AtelierLlamdexForCausalLM"
MAX_SLOTS = 64  # ConnectorsSpec.num_slots <= 64
ID_BITS = 24
FIELDS = ("atelier_expert", "atelier_slots", "atelier_nonce")
_WEIGHTS = 2 ** torch.arange(ID_BITS, dtype=torch.int64)


def expert_item(slot_id: int, num_slots: int, nonce: int) -> dict[str, Tensor]:
    """The ``image`` multimodal item of one expert request (see the module docstring)."""
    if not 1 <= num_slots <= MAX_SLOTS:
        raise ValueError(f"num_slots {num_slots} outside [1, {MAX_SLOTS}]")
    return {"atelier_expert": torch.tensor([[slot_id]]), "atelier_slots": torch.tensor([[num_slots]]),
            "atelier_nonce": torch.tensor([[nonce % 2**ID_BITS]])}


def _bits(value: int) -> Tensor:
    return ((torch.tensor(value) >> torch.arange(ID_BITS)) & 1).to(torch.float32)


def _ints(bits: Tensor) -> Tensor:
    """[m, ID_BITS] 0/1 rows -> [m] int64."""
    return (bits.round().to(torch.int64) * _WEIGHTS.to(bits.device)).sum(-1)


# ------------------------------------------------------------------------------------------- processing
class LlamdexDataParser(MultiModalDataParser):
    """Accepts the ``image`` item of :func:`expert_item` (a dict of small integer tensors) only."""

    def _parse_image_data(self, data):
        if data is None:
            return None
        if not isinstance(data, Mapping) or set(data) != set(FIELDS):
            raise ValueError(f"the Llamdex model takes multi_modal_data={{'image': {{{', '.join(FIELDS)}}}}} "
                             "(serve_app.vllm_plugin.llamdex_model.expert_item); images are not supported")
        return DictEmbeddingItems(data, "image", required_fields=set(FIELDS),
                                  fields_factory=lambda _: {k: MultiModalFieldConfig.batched("image") for k in FIELDS})


class LlamdexProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": MAX_SLOTS}

    def get_data_parser(self) -> MultiModalDataParser:
        return LlamdexDataParser()

    def placeholder_token_id(self) -> int:
        tok = self.get_tokenizer()
        for tid in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), 0):
            if tid is not None:
                return int(tid)
        return 0


class LlamdexDummyInputs(BaseDummyInputsBuilder[LlamdexProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if not mm_counts.get("image"):
            return {}
        return {"image": expert_item(-1 % 2**ID_BITS, MAX_SLOTS, 0)}


class LlamdexProcessor(BaseMultiModalProcessor[LlamdexProcessingInfo]):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {k: MultiModalFieldConfig.batched("image") for k in FIELDS}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        placeholder = self.info.placeholder_token_id()

        def slots(item_idx: int) -> list[int]:
            n = int(out_mm_kwargs["image"][item_idx]["atelier_slots"].data.reshape(-1)[0])
            return [placeholder] * n

        return [PromptInsertion(modality="image", target=PromptIndexTargets.end(), insertion=slots)]


# ------------------------------------------------------------------------------------------- experts
@dataclass
class _Step:
    """What embed_input_ids saw for the current forward: slot rows and their ids."""

    mask: Tensor  # [T] bool: slot positions
    expert: Tensor  # [S] worker slot id per slot row
    nonce: Tensor  # [S]
    embeds: Tensor  # [T, d] input embeddings (the encoder reads the prompt's)


class ExpertTable:
    """Bundles loaded in this worker (slot id -> llamdex Bundle) and the features each request read."""

    def __init__(self, tokenizer_path: str, max_results: int = 4096):
        self.bundles: dict[int, Any] = {}
        self.results: OrderedDict[int, dict] = OrderedDict()
        self.max_results = max_results
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        return self._tokenizer

    def record(self, nonce: int, features: Tensor, stated: Tensor) -> None:
        """Keep what the encoder read for request ``nonce`` (codec-space features, stated flags)."""
        with self._lock:
            self.results[nonce] = {"encoded_features": features.tolist(), "stated": [bool(x) for x in stated.tolist()]}
            while len(self.results) > self.max_results:
                self.results.popitem(last=False)

    def pop(self, nonces: Iterable[int]) -> dict[int, dict | None]:
        with self._lock:
            return {n: self.results.pop(n % 2**ID_BITS, None) for n in nonces}

    def slot_vectors(self, bundle, hidden: Tensor, embeds: Tensor,
                     prompt_ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """encoder → expert → decoder on one prompt's layer-k states (P, d)
        -> (slots (n, d), features (m,), stated (F,) bool)."""
        from llamdex.literals import layout, token_literals

        literals = None
        if bundle.encoder.copies:
            lits = token_literals(self.tokenizer, prompt_ids)
            literals = layout([lits], bundle.encoder.cfg.vocabulary, len(prompt_ids), left=True)
        mask = torch.ones(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
        slots, features, stated = bundle.slots(hidden.float()[None], mask, embeds.float()[None], literals)
        return slots[0], features[0], stated[0]


@ignore_torch_compile
class LlamdexLlamaModel(LlamaModel):
    """LlamaModel whose forward writes expert slots at the input of their bundle's layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.experts = ExpertTable(vllm_config.model_config.tokenizer)
        self.step: _Step | None = None

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **extra_layer_kwargs) -> Tensor:
        if self.start_layer != 0 or intermediate_tensors is not None:
            raise NotImplementedError("the Llamdex model does not support pipeline parallelism")
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        step, self.step = self.step, None
        layers = self._slot_layers(step)
        for idx, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer)):
            if idx in layers:
                stream = hidden if residual is None else hidden + residual
                hidden, residual = self._write_slots(idx, stream, step, input_ids, positions), None
            hidden, residual = layer(positions, hidden, residual, **extra_layer_kwargs)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _slot_layers(self, step: _Step | None) -> set[int]:
        if step is None:
            return set()
        return {self.experts.bundles[e].spec.layer for e in step.expert.unique().tolist() if e in self.experts.bundles}

    def _write_slots(self, layer: int, stream: Tensor, step: _Step, input_ids: Tensor | None,
                     positions: Tensor) -> Tensor:
        """Overwrite the slot rows of every request whose bundle inserts at ``layer``."""
        rows = step.mask.nonzero().squeeze(1)
        stream = stream.clone()
        start = 0
        while start < rows.numel():  # one run of consecutive slot rows per request
            expert, nonce = int(step.expert[start]), int(step.nonce[start])
            end = start + 1
            while end < rows.numel() and int(step.nonce[end]) == nonce and int(rows[end]) == int(rows[end - 1]) + 1:
                end += 1
            bundle = self.experts.bundles.get(expert)
            if bundle is not None and bundle.spec.layer == layer:
                first = int(rows[start])
                prompt_len = int(positions[first])
                lo = first - prompt_len
                n = bundle.spec.num_slots
                if end - start != n or lo < 0 or int(positions[lo]) != 0:
                    raise RuntimeError(
                        f"expert request {nonce}: its prompt and its {n} slots are not all in this forward "
                        f"(found {end - start} slots, prompt start at row {lo}); the engine must run with chunked "
                        "prefill off and a per-request cache_salt (serve_app.vllm_plugin engine_kwargs)")
                if input_ids is None:
                    raise RuntimeError("the Llamdex model needs input_ids (requires_raw_input_tokens)")
                slots, features, stated = self.experts.slot_vectors(bundle, stream[lo:first], step.embeds[lo:first],
                                                            input_ids[lo:first].tolist())
                stream[first:first + n] = slots.to(stream.dtype)
                self.experts.record(nonce, features, stated)
            start = end
        return stream


@MULTIMODAL_REGISTRY.register_processor(LlamdexProcessor, info=LlamdexProcessingInfo, dummy_inputs=LlamdexDummyInputs)
class LlamdexForCausalLM(LlamaForCausalLM, SupportsMultiModal):
    """A Llama served with Llamdex expert slots (architecture ``AtelierLlamdexForCausalLM``)."""

    requires_raw_input_tokens = True

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        return LlamdexLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return None

    @property
    def experts(self) -> ExpertTable:
        return self.model.experts

    def embed_multimodal(self, **kwargs: object) -> list[Tensor]:
        """Per expert item: [n, d + 2·ID_BITS] = the decoder's placeholder | slot id bits | nonce bits."""
        d = self.config.hidden_size
        out = []
        for expert, n, nonce in zip(*(self._flat(kwargs[k]) for k in FIELDS), strict=True):
            bundle = self.experts.bundles.get(expert)
            if bundle is None and expert != (-1 % 2**ID_BITS):
                raise RuntimeError(f"expert slot {expert} is not loaded in this worker (atelier_expert_load first)")
            place = (bundle.decoder.placeholder[:n].float() if bundle is not None
                     else torch.zeros(n, d))
            ids = torch.cat([_bits(expert), _bits(nonce)])[None].expand(n, -1)
            out.append(torch.cat([place.to(ids.device), ids], dim=1))
        return out

    @staticmethod
    def _flat(value) -> list[int]:
        if isinstance(value, Tensor):
            return [int(v) for v in value.reshape(-1).tolist()]
        return [int(v) for t in value for v in torch.as_tensor(t).reshape(-1).tolist()]

    def embed_input_ids(self, input_ids: Tensor, multimodal_embeddings=None, *, is_multimodal: Tensor | None = None,
                        **kwargs) -> Tensor:
        embeds = self.model.embed_input_ids(input_ids)
        self.model.step = None
        if not multimodal_embeddings or is_multimodal is None:
            return embeds
        mask = is_multimodal.to(embeds.device)
        rows = torch.cat([e.to(embeds.device) for e in multimodal_embeddings])
        d = embeds.shape[-1]
        if rows.shape[0] != int(mask.sum()) or rows.shape[1] != d + 2 * ID_BITS:
            raise RuntimeError(f"Llamdex slot rows {tuple(rows.shape)} do not match {int(mask.sum())} slot positions")
        embeds = embeds.clone()
        embeds[mask] = rows[:, :d].to(embeds.dtype)
        self.model.step = _Step(mask=mask, expert=_ints(rows[:, d:d + ID_BITS]),
                                nonce=_ints(rows[:, d + ID_BITS:]), embeds=embeds)
        return embeds


def register_llamdex_model() -> None:
    """Make ``AtelierLlamdexForCausalLM`` resolvable by vLLM's model registry."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, LlamdexForCausalLM)


def engine_kwargs_for_experts() -> dict[str, Any]:
    """EngineArgs that serve the base model as the Llamdex architecture."""
    return {"hf_overrides": {"architectures": [ARCHITECTURE]}, "enable_mm_embeds": True,
            "limit_mm_per_prompt": {"image": 1}, "enable_chunked_prefill": False, "enforce_eager": True,
            "logits_processors": ["serve_app.vllm_plugin.first_token:ClassAnswerFirst"]}
