"""Literals in a prompt -- numbers and yes/no words -- located on its tokens (the encoder's copy channel).

Why: the encoder reads layer-k hidden states, which tell *where* a feature's value is written
("the number after 'chlorides'") far better than *what* a multi-digit decimal is: a 135M model's
state at the last digit of "0.045" does not hold the number exactly. Measured on the paper's
datasets (docs/llamdex.md), an encoder that regresses values from hidden states reads wine's
narrow-range decimals and bank's long-tailed counts worse than predicting the mean. So numeric
and bool features are *copied*: the encoder points at a literal token (pointer attention over
the hidden states) and takes that literal's exact value from the token text, like the copy
mechanism of pointer-generator networks. The paper's encoder also sees the exact digits (it reads
the logit-lens text of h_k with RoBERTa); here the digits come from the prompt's own tokens.

Per token of a prompt, :func:`token_literals` gives a *kind* (none, number, yes-word, no-word) and
the value of the literal the token belongs to. Numbers are digits with an optional sign, decimals
and thousands separators ("-1,234.5"), or English number words 0..999 ("forty-two", "two hundred
and five", the forms :func:`llamdex.questions.number_words` writes). Yes-words: yes/true; no-words:
no/false (case-insensitive, whole words). The system prompt's "Yes or No" is tagged too: the
pointer learns to look past it. For category features, :meth:`PromptLiterals.mentions` marks the
tokens of each mention of one of the feature's categories (as the grammar writes them, "_" as a
space; whole words, case-insensitive, longest first), so categories are copied too.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

NONE, NUMBER, YES, NO = 0, 1, 2, 3
KINDS = 4

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i >= 2}
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | _TENS
_UNIT_RE = "|".join(sorted(_UNITS, key=len, reverse=True))
_DIGIT_RE = "|".join(sorted(_UNITS[1:10], key=len, reverse=True))
_TENS_RE = "|".join(_TENS)
_UNDER_100 = rf"(?:(?:{_TENS_RE})(?:-(?:{_DIGIT_RE}))?|{_UNIT_RE})"
_WORDS = rf"(?:(?:{_DIGIT_RE}) hundred(?: and {_UNDER_100})?|{_UNDER_100})"
LITERAL = re.compile(
    r"(?P<num>(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w]))"
    rf"|(?P<words>\b{_WORDS}\b)"
    r"|(?P<yes>\b(?:yes|true)\b)|(?P<no>\b(?:no|false)\b)",
    re.IGNORECASE)


def words_value(text: str) -> int:
    """Value of English number words 0..999 as :func:`llamdex.questions.number_words` writes them."""
    total, text = 0, text.lower()
    if " hundred" in text:
        head, _, text = text.partition(" hundred")
        total = 100 * _WORD_VALUE[head]
        text = text.removeprefix(" and ").strip()
    if text:
        tens, _, ones = text.partition("-")
        total += _WORD_VALUE[tens] + (_WORD_VALUE[ones] if ones else 0)
    return total


@dataclass(frozen=True)
class Literal:
    """One literal in a text: character span, kind and value (1/0 for yes/no words)."""

    start: int
    end: int
    kind: int
    value: float


def find_literals(text: str) -> list[Literal]:
    """Every number and yes/no literal in ``text``, left to right."""
    out = []
    for m in LITERAL.finditer(text):
        if m.group("num"):
            out.append(Literal(m.start(), m.end(), NUMBER, float(m.group("num").replace(",", ""))))
        elif m.group("words"):
            out.append(Literal(m.start(), m.end(), NUMBER, float(words_value(m.group("words")))))
        else:
            yes = m.group("yes") is not None
            out.append(Literal(m.start(), m.end(), YES if yes else NO, 1.0 if yes else 0.0))
    return out


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> list[str]:
    """Text of every vocabulary id decoded alone (cached per tokenizer object)."""
    texts = _TEXTS.get(tokenizer)
    if texts is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        _TEXTS[tokenizer] = texts
    return texts


@dataclass(frozen=True)
class PromptLiterals:
    """Per token of one prompt: ``kinds`` (T,) int64, ``values`` (T,) float64; plus the decoded text
    (the tokens' texts concatenated) and each token's start offset in it (for locating spans)."""

    kinds: torch.Tensor
    values: torch.Tensor
    text: str
    offsets: list[int]

    def mentions(self, categories: list[list[str]]) -> torch.Tensor:
        """(len(categories), T) int64: per category feature, the index of the category whose mention
        each token is part of, else -1."""
        out = torch.full((len(categories), len(self.kinds)), -1, dtype=torch.long)
        for j, names in enumerate(categories):
            spelled = {n.replace("_", " ").lower(): k for k, n in enumerate(names)}
            pattern = "|".join(re.escape(n) for n in sorted(spelled, key=len, reverse=True))
            for m in re.finditer(rf"(?<!\w)(?:{pattern})(?!\w)", self.text, re.IGNORECASE):
                out[j, self.tokens_in(m.start(), m.end())] = spelled[m.group(0).lower()]
        return out

    def tokens_in(self, start: int, end: int, kind: int | None = None) -> list[int]:
        """Token positions overlapping characters [start, end) of :attr:`text` (of ``kind`` if given)."""
        ends = [max(a, b) for a, b in zip(self.offsets, self.offsets[1:] + [len(self.text)], strict=True)]
        return [t for t, (s, e) in enumerate(zip(self.offsets, ends, strict=True))
                if s < end and e > start and (kind is None or int(self.kinds[t]) == kind)]


def token_literals(tokenizer, ids: list[int]) -> PromptLiterals:
    """Kinds and values of the literals each token of ``ids`` belongs to (see module docstring)."""
    table = token_texts(tokenizer)
    pieces = [table[i] if 0 <= i < len(table) else "" for i in ids]
    if any("\ufffd" in p for p in pieces):  # a token holds part of a multi-byte character: decode prefixes
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        offsets = [len(tokenizer.decode(ids[:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                       .rstrip("\ufffd")) for t in range(len(ids))]
    else:
        offsets, pos = [], 0
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        text = "".join(pieces)
    kinds = torch.zeros(len(ids), dtype=torch.long)
    values = torch.zeros(len(ids), dtype=torch.float64)
    lits = PromptLiterals(kinds, values, text, offsets)
    for lit in find_literals(text):
        for t in lits.tokens_in(lit.start, lit.end):
            kinds[t], values[t] = lit.kind, lit.value
    return lits


@dataclass(frozen=True)
class LiteralBatch:
    """Literal channels of a batch laid out like the hidden states: kinds (B, T), values (B, T) and
    category mentions (B, F_cat, T) for one schema's category features."""

    kinds: torch.Tensor
    values: torch.Tensor
    mentions: torch.Tensor


def layout(items: list[PromptLiterals], categories: list[list[str]], width: int | None = None,
           left: bool = False) -> LiteralBatch:
    """Stack prompts' literals into a batch of ``width`` columns, right-padded (as
    :meth:`PromptCache.hidden_batch`) or left-padded (as a serving batch); pads are kind NONE."""
    width = width or max(len(p.kinds) for p in items)
    kinds = torch.zeros(len(items), width, dtype=torch.long)
    values = torch.zeros(len(items), width, dtype=torch.float64)
    mentions = torch.full((len(items), len(categories), width), -1, dtype=torch.long)
    for r, p in enumerate(items):
        cols = slice(width - len(p.kinds), width) if left else slice(0, len(p.kinds))
        kinds[r, cols], values[r, cols] = p.kinds, p.values
        mentions[r, :, cols] = p.mentions(categories)
    return LiteralBatch(kinds, values, mentions)


def value_tokens(lits: PromptLiterals, question: str, spans: dict[str, tuple[int, int]],
                 kinds: dict[str, tuple[int, ...] | None]) -> dict[str, list[int]]:
    """Where each feature's value (or label) is written, as token positions of the prompt: ``spans``
    are character spans in ``question`` (:class:`llamdex.questions.Question`), located inside the
    prompt's text; ``kinds`` gives the literal kinds each feature may point at (NUMBER, or YES/NO;
    None = any token, for labels)."""
    base = lits.text.rfind(question)
    if base < 0:
        raise ValueError("question: not found verbatim in the decoded prompt; fix: use a chat template that "
                         "keeps the user message as written")
    out = {}
    for name, allowed in kinds.items():
        if name in spans:
            s, e = spans[name]
            out[name] = [t for t in lits.tokens_in(base + s, base + e) if allowed is None or int(lits.kinds[t]) in allowed]
    return out


def target_mask(targets: list[dict[str, list[int]]], names: list[str], width: int,
                null_when_absent: frozenset[str] = frozenset()) -> torch.Tensor:
    """(B, len(names), width + 1) bool: True at the tokens each row's feature ``names[j]`` is written
    at; the last column ("not stated") is True for features in ``null_when_absent`` that a row lacks."""
    mask = torch.zeros(len(targets), len(names), width + 1, dtype=torch.bool)
    for r, row in enumerate(targets):
        for j, name in enumerate(names):
            if name in row:
                mask[r, j, row[name]] = True
            elif name in null_when_absent:
                mask[r, j, width] = True
    return mask
