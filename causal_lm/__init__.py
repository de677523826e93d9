"""What every part of Atelier needs to know about a Hugging Face causal LM and its chat tokenizer.

One home, one meaning each, for the helpers both sciences (``llamdex``: experts inside the
forward pass; ``compression.codebook``: the LoRA tasks) and the serving engines use:

* :func:`base_lm` / :func:`backbone` / :func:`num_layers` -- the model under a PEFT wrapper, its
  Llama-style decoder stack (``model.model`` with ``embed_tokens``, ``layers``, ``norm``,
  ``rotary_emb``) and its number of decoder layers;
* :func:`left_pad` -- a batch of sequences (token lists or per-position tensors) left-padded, with
  its attention mask and position ids (positions count real tokens only);
* :func:`chat_ids` -- a conversation rendered with the tokenizer's chat template up to the
  assistant's first token (training, evaluation and serving all encode prompts this way);
* :func:`end_of_turn_id` -- the token the chat template closes an assistant turn with (what a
  one-word answer must be followed by); :func:`stop_token_ids` -- where generation stops: that token
  and EOS.

Plain torch + transformers tokenizers; no Ray, no system package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def base_lm(model):
    """The underlying ``*ForCausalLM`` of a plain or PEFT-wrapped model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model):
    """The decoder stack (``model.model``) of a Llama-style causal LM (PEFT wrappers are looked through);
    TypeError if it is not one."""
    inner = getattr(base_lm(model), "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
    if inner is None or missing:
        raise TypeError(f"model: {type(model).__name__} is not a Llama-style causal LM (missing model.{missing}); "
                        "fix: pass a LlamaForCausalLM-like model (SmolLM2, Llama, Mistral)")
    return inner


def num_layers(model) -> int:
    """Number of decoder layers L (``config.num_hidden_layers`` of the underlying LM)."""
    return int(base_lm(model).config.num_hidden_layers)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens count 0, 1, ...; padding sits at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int] | torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """Left-pad sequences to the longest -> (padded, attention mask, position ids).

    Token lists become a long tensor (B, T); tensors [T_i, ...] (e.g. hidden states [T_i, d]) keep
    their dtype and trailing dimensions (B, T, ...). The mask (B, T) is 1 on real positions."""
    rows = [s if isinstance(s, torch.Tensor) else torch.tensor(list(s), dtype=torch.long) for s in seqs]
    width = max(int(r.shape[0]) for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), pad_value)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return out, mask, position_ids(mask)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, up to the assistant's first token."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [int(i) for i in enc["input_ids"]]


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template emits right after an assistant reply (``<|im_end|>`` for ChatML).

    Read from the template itself (render a one-token reply, take the token after it); EOS when the
    template puts nothing there. Cached on the tokenizer."""
    cached = getattr(tokenizer, "_atelier_eot_id", None)
    if cached is not None:
        return cached
    msgs = [{"role": "user", "content": "q"}]
    prompt = chat_ids(tokenizer, msgs)
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


def stop_token_ids(tokenizer) -> set[int]:
    """Token ids where generation stops: the end-of-turn token and EOS (the Expert-API baseline,
    Llamdex evaluation and the serving engines stop on the same set)."""
    ids = (tokenizer.eos_token_id, end_of_turn_id(tokenizer))
    return {int(i) for i in ids if isinstance(i, int) and i >= 0}
