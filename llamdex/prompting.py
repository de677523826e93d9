"""Prompts shared by connector training and insertion: system prompt, chat template, answer tokens.

Training and serving must build byte-identical prompts (the encoder reads the prompt's hidden
states), so both go through :func:`chat_prompt_ids`. The prompt is the tokenizer's chat template
with a system prompt asking for a one-word answer and ``add_generation_prompt=True``, so that the
appended expert slots follow ``<|im_start|>assistant\\n`` and the answer is read at the last slot
(paper pitfall 1).

Answer tokens (paper pitfall 8): each class must map to one distinct vocabulary token. We try the
capitalised class name, then the name as written ("yes" -> "Yes"); if any class has no single-token
spelling (e.g. "very_recom", or "10" with digit-split tokenizers) every class falls back to the
letters A, B, C, ... like the paper's multiclass datasets, and the system prompt lists the mapping.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from causal_lm import chat_ids

SYSTEM_WORDS = "Respond to the user's question with only one word: {options}."
SYSTEM_LETTERS = "Respond to the user's question with only one letter: {options}."


@dataclass(frozen=True)
class AnswerTokens:
    """The restricted output vocabulary: one token string and id per class, plus the system prompt."""

    strings: list[str]
    ids: list[int]
    system_prompt: str


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _options(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def answer_tokens(tokenizer, class_names: list[str]) -> AnswerTokens:
    """Pick one single-token answer string per class (see module docstring for the rule)."""
    chosen: list[tuple[str, int]] = []
    for name in class_names:
        for text in dict.fromkeys((name[:1].upper() + name[1:], name)):
            tid = _single_token(tokenizer, text)
            if tid is not None:
                chosen.append((text, tid))
                break
    if len(chosen) == len(class_names) and len({t for _, t in chosen}) == len(chosen):
        strings = [s for s, _ in chosen]
        return AnswerTokens(strings, [t for _, t in chosen], SYSTEM_WORDS.format(options=_options(strings)))
    if len(class_names) > len(string.ascii_uppercase):
        raise ValueError(f"class_names: {len(class_names)} classes but only 26 answer letters; "
                         "fix: merge classes (at most 26)")
    letters = list(string.ascii_uppercase[: len(class_names)])
    ids = [_single_token(tokenizer, c) for c in letters]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("tokenizer: the letters A..Z are not single tokens; fix: use a tokenizer with "
                         "single-token capital letters or class names")
    options = _options([f"{c} ({n})" for c, n in zip(letters, class_names, strict=True)])
    return AnswerTokens(letters, [int(i) for i in ids], SYSTEM_LETTERS.format(options=options))  # type: ignore[arg-type]


def chat_prompt_ids(tokenizer, system_prompt: str, questions: list[str]) -> list[list[int]]:
    """Token ids of ``[system, user=question]`` rendered with the chat template + generation prompt."""
    return [chat_ids(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": q}])
            for q in questions]
