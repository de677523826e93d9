"""The Expert-API baseline (paper §5.2): the LLM *writes* the expert's query, a parser feeds the expert.

The LLM gets the public schema (as JSON: feature names, types, ranges or categories) in its
system prompt and is asked to turn the user's question into one ``name: value`` line per
feature; generation is greedy and stops at the end of turn or after ``max_new_tokens``. A
regex parser reads the lines back; what it cannot read is filled like the paper's code does
(numeric -> 0 clipped into the schema range, category -> missing, bool -> false). The expert's
prediction on the parsed row *is* the answer.

Two ways to get the reply: :func:`generate_queries` is the paper's (the LLM writes the whole
query); :func:`guided_queries` writes each ``name:`` for the LLM and lets it write only the
values, the strongest form of the baseline for a small model that does not keep the format.

Parsing is deliberately forgiving (labels matched by name, description or alias, case and
``_`` vs space ignored; numbers as digits, with thousands separators or as words up to 999;
categories matched as words inside the value) so the baseline measures the LLM, not a strict
parser.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from causal_lm import stop_token_ids
from llamdex.codec import FeatureCodec
from llamdex.literals import token_texts
from llamdex.prompting import chat_prompt_ids
from llamdex.questions import number_words
from llamdex.schema import FeatureSpec, TenantSchema

SYSTEM = ("You turn a user's question into a query for a prediction model. The model's input fields are "
          "described by this JSON schema:\n{schema}\n"
          "Reply with exactly one line per field, in the form `name: value`, using the field names above and "
          "nothing else. Use a number for int and float fields, one of the listed categories for category "
          "fields, and yes or no for bool fields.")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORDS = {number_words(n): n for n in range(1000)}


@dataclass(frozen=True)
class ParsedQuery:
    """One parsed reply: the row for the codec and which features were actually read."""

    row: dict[str, Any]
    found: dict[str, bool]


def schema_prompt(schema: TenantSchema) -> str:
    """The system prompt: the public schema's fields as compact JSON (what the LLM may write)."""
    fields = []
    for f in schema.features:
        entry: dict[str, Any] = {"name": f.name, "type": f.type}
        if f.type in ("int", "float"):
            entry["range"] = [f.lo, f.hi]
        if f.categories:
            entry["categories"] = list(f.categories)
        if f.description:
            entry["description"] = f.description
        fields.append(entry)
    return SYSTEM.format(schema=json.dumps({"fields": fields}, ensure_ascii=False))


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().strip("`*-").lower())


def _labels(f: FeatureSpec) -> set[str]:
    return {_key(x) for x in (f.name, f.description or "", *f.aliases) if x}


def _number(value: str) -> float | None:
    m = _NUMBER.search(value)
    if m:
        try:
            return float(m.group(0).replace(",", ""))
        except ValueError:
            return None
    words = _key(value)
    for text in sorted(_WORDS, key=len, reverse=True):  # longest first: "forty-two" before "forty"
        if re.search(rf"\b{re.escape(_key(text))}\b", words):
            return float(_WORDS[text])
    return None


def _category(f: FeatureSpec, value: str) -> str | None:
    words = f" {_key(value)} "
    hits = [c for c in (f.categories or []) if f" {_key(c)} " in words]
    return max(hits, key=len) if hits else None


def _bool(value: str) -> bool | None:
    v = _key(value)
    if re.match(r"^(yes|true|y|1)\b", v):
        return True
    if re.match(r"^(no|false|n|0)\b", v):
        return False
    return None


def parse_reply(schema: TenantSchema, reply: str) -> ParsedQuery:
    """Read ``name: value`` lines; fill what is missing like the paper (numeric 0 clipped, category None)."""
    by_label = {label: f for f in schema.features for label in _labels(f)}
    raw: dict[str, str] = {}
    for line in reply.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            name, sep, value = line.partition("=")
        f = by_label.get(_key(name)) if sep else None
        if f is not None and f.name not in raw:
            raw[f.name] = value
    row: dict[str, Any] = {}
    found: dict[str, bool] = {}
    for f in schema.features:
        text = raw.get(f.name, "")
        if f.type in ("int", "float"):
            v = _number(text) if text else None
            found[f.name] = v is not None
            v = float(np.clip(0.0 if v is None else v, f.lo, f.hi))
            row[f.name] = int(round(v)) if f.type == "int" else v
        elif f.type == "bool":
            b = _bool(text) if text else None
            found[f.name] = b is not None
            row[f.name] = bool(b)
        else:
            c = _category(f, text) if text else None
            found[f.name] = c is not None
            row[f.name] = c
    return ParsedQuery(row, found)


@torch.no_grad()
def generate_queries(model, tokenizer, schema: TenantSchema, questions: Sequence[str], max_new_tokens: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy replies of the LLM to the schema prompt + each question (stops at the end of turn or after
    ``max_new_tokens``); ``progress(done, total)`` after each question. One question at a time on the
    schema prompt's shared KV cache (:func:`_question_states`; against left-padded batches:
    ``python -m bench.expert_api_speed``)."""
    limit = max_new_tokens or 12 * len(schema.features) + 16
    stop = stop_token_ids(tokenizer)
    replies = []
    for n, (cache, logits) in enumerate(_question_states(model, tokenizer, schema, questions)):
        reply, _ = _greedy(model, cache, logits, stop, limit)
        replies.append(tokenizer.decode(reply, skip_special_tokens=True))
        if progress is not None:
            progress(n + 1, len(questions))
    return replies


@torch.no_grad()
def guided_queries(model, tokenizer, schema: TenantSchema, questions: Sequence[str], max_value_tokens: int = 8,
                   progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Replies in the same ``name: value`` form, but the field names are written *for* the LLM: after
    the same schema prompt + question, each line's ``name:`` is fed to it and it writes the value
    greedily until a line break, the end of turn or ``max_value_tokens``. A 135M model rarely keeps
    the free-form format (:func:`generate_queries`), so this is the strongest Expert-API we can give
    it while the LLM still reads every value itself. One question at a time, reusing its KV cache."""
    stop = stop_token_ids(tokenizer) | {i for i, text in enumerate(token_texts(tokenizer)) if "\n" in text}
    replies = []
    for n, (cache, _) in enumerate(_question_states(model, tokenizer, schema, questions)):
        lines = []
        for i, f in enumerate(schema.features):
            forced = tokenizer(("\n" if i else "") + f.name + ":", add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([forced]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            value, _ = _greedy(model, cache, logits, stop, max_value_tokens)
            lines.append(f"{f.name}: " + tokenizer.decode(value, skip_special_tokens=True).strip())
        replies.append("\n".join(lines))
        if progress is not None:
            progress(n + 1, len(questions))
    return replies


def _question_states(model, tokenizer, schema: TenantSchema, questions: Sequence[str]
                     ) -> Iterator[tuple[DynamicCache, torch.Tensor]]:
    """(KV cache, next-token logits) after the schema prompt + each question, one question at a time.
    The token prefix every prompt shares (the schema prompt) runs once and its cache is copied per
    question, so only the question's own tokens are computed again."""
    prompts = chat_prompt_ids(tokenizer, schema_prompt(schema), list(questions))
    # commonprefix compares any sequences element-wise; each question keeps >= 1 token to read logits from
    shared = max(len(os.path.commonprefix(prompts)) - 1, 0) if prompts else 0
    prefix = DynamicCache()
    if shared:
        model(torch.tensor([prompts[0][:shared]]), past_key_values=prefix, use_cache=True, logits_to_keep=1)
    for prompt in prompts:
        cache = copy.deepcopy(prefix)
        logits = model(torch.tensor([prompt[shared:]]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        yield cache, logits


def _greedy(model, cache: DynamicCache, logits: torch.Tensor, stop: set[int], limit: int
            ) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from ``logits`` until a ``stop`` token or ``limit`` tokens; every written token is
    fed into ``cache`` (so text can be forced after it). Returns the tokens and the last logits."""
    tokens: list[int] = []
    while len(tokens) < limit and (token := int(logits[0, -1].argmax())) not in stop:
        tokens.append(token)
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return tokens, logits


def expert_api_inputs(schema: TenantSchema, replies: Sequence[str]) -> tuple[np.ndarray, float]:
    """(codec-encoded parsed rows (N, m), share of (row, feature) values the parser could read)."""
    parsed = [parse_reply(schema, r) for r in replies]
    x = FeatureCodec(schema).encode([p.row for p in parsed])
    read = float(np.mean([v for p in parsed for v in p.found.values()])) if parsed else 0.0
    return x, read
