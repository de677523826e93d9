"""Literals in a prompt -- numbers, yes/no words, the schema's own words -- located on its tokens.

Why: the encoder reads layer-k hidden states, which tell *where* a feature's value is written
("the number after 'chlorides'") far better than *what* a multi-digit decimal is: a 135M model's
state at the last digit of "0.045" does not hold the number exactly. Measured on the paper's
datasets (docs/llamdex.md), an encoder that regresses values from hidden states reads wine's
narrow-range decimals and bank's long-tailed counts worse than predicting the mean. So features
are *copied*: the encoder points at a literal token (pointer attention over the hidden states)
and takes that literal's exact value from the token text, like the copy mechanism of
pointer-generator networks.

Per token of a prompt, :func:`token_literals` gives a *kind* and the value of the literal the token
belongs to:

* NUMBER: digits with sign, decimals, thousands separators (groups of three: "1,234" is one number,
  "1,36" two, as in a CSV row), a currency symbol, a ``k``/"thousand"/"million" multiplier or an
  ordinal suffix ("-1,234.5", "£7.25", "2k", "21st"); number words up to
  999,999 ("twenty-two", "twenty two", "two thousand and five"), ordinal words ("third",
  "twenty-first") and count words ("once", "twice", "a dozen");
* YES: yes/true/yeah; NO: false/not/n't/never/without (negations: a bool's "false");
* ZERO: "no"/"none"/"nil" -- a count of zero ("no siblings") *and* a bool's false ("loan: no");
* ONE: "a"/"an" -- a count of one ("a parent").

The system prompt's "Yes or No" is tagged too: the pointer learns to look past it. Besides kinds,
:meth:`PromptLiterals.mentions` marks, per feature, the tokens of each mention of one of its values
through the schema's vocabulary (:func:`llamdex.vocabulary.value_phrases`: a category's name,
synonyms and ordinal/number forms; a bool's true/false phrases and labels; a numeric feature's
special-value phrases; whole words, case-insensitive, longest first, "-" and " " alike).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

from llamdex.vocabulary import COUNT_WORDS, ONES, ORDINAL_ONES, ORDINAL_TENS, TENS

NONE, NUMBER, YES, NO, ZERO, ONE = 0, 1, 2, 3, 4, 5
KINDS = 6

_WORD_VALUE = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if i >= 2}
_ORD_VALUE = {w: i for i, w in enumerate(ORDINAL_ONES) if i} | {w: 10 * i for i, w in enumerate(ORDINAL_TENS) if i >= 2}


def _alt(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_UNIT_RE, _DIGIT_RE, _TENS_RE = _alt(ONES), _alt(ONES[1:10]), _alt(TENS[2:])
_UNDER_100 = rf"(?:(?:{_TENS_RE})(?:[- ](?:{_DIGIT_RE}))?|{_UNIT_RE})"
_UNDER_1000 = rf"(?:(?:{_DIGIT_RE}|a) hundred(?: and {_UNDER_100}| {_UNDER_100})?|{_UNDER_100})"
_WORDS = rf"(?:(?:{_UNDER_1000}|a) thousand(?:(?: and)? {_UNDER_1000})?|{_UNDER_1000})"
_ORDINALS = rf"(?:(?:{_TENS_RE})-(?:{_alt(ORDINAL_ONES[1:10])})|{_alt(_ORD_VALUE)})"
LITERAL = re.compile(
    r"(?P<num>(?<![\w.])(?P<sign>-|−|minus )?(?P<cur>[£$€¥] ?)?(?P<sign2>-)?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
    r"(?:(?P<kilo>k\b)|(?P<mult> (?:thousand|million)\b)|(?P<ord>st|nd|rd|th)\b)?(?!\d|\.\d))"
    rf"|(?P<ordinal>\b{_ORDINALS}\b)"
    rf"|(?P<words>\b(?:minus )?{_WORDS}\b)"
    rf"|(?P<count>\b(?:a )?(?:{_alt(COUNT_WORDS)})\b)"
    r"|(?P<yes>\b(?:yes|true|yeah|yep)\b)|(?P<no>\b(?:false|not|never|without|nope)\b|n't\b)"
    r"|(?P<zero>\b(?:no|none|nil)\b)|(?P<one>\b(?:a|an)\b)",
    re.IGNORECASE)


def words_value(text: str) -> int:
    """Value of English number words 0..999,999 ('forty-two', 'twenty two', 'a hundred and five',
    'two thousand and five')."""
    text = " ".join(text.lower().replace("-", " ").split())
    total = 0
    if " thousand" in text or text.startswith("thousand"):
        head, _, text = text.partition("thousand")
        total += 1000 * (words_value(head) if head.strip() not in ("", "a") else 1)
        text = text.strip().removeprefix("and ").strip()
    if "hundred" in text:
        head, _, text = text.partition("hundred")
        total += 100 * (_WORD_VALUE[head.strip()] if head.strip() not in ("", "a") else 1)
        text = text.strip().removeprefix("and ").strip()
    return total + sum(_WORD_VALUE[w] for w in text.split())


def _number_value(m: re.Match) -> float:
    value = float(m.group("digits").replace(",", "") + (m.group("frac") or ""))
    if m.group("kilo"):
        value *= 1000
    elif m.group("mult"):
        value *= 1_000_000 if "million" in m.group("mult").lower() else 1000
    return -value if (m.group("sign") or m.group("sign2")) else value


@dataclass(frozen=True)
class Literal:
    """One literal in a text: character span, kind and value (1/0 for yes/no words)."""

    start: int
    end: int
    kind: int
    value: float


def find_literals(text: str) -> list[Literal]:
    """Every literal in ``text`` (see the module docstring), left to right."""
    out = []
    for m in LITERAL.finditer(text):
        group = m.lastgroup if m.lastgroup in ("words", "ordinal", "count", "yes", "no", "zero", "one") else "num"
        s, e = m.start(), m.end()
        if group == "num":
            out.append(Literal(s, e, NUMBER, _number_value(m)))
        elif group == "words":
            words = m.group("words")
            sign = -1.0 if words.lower().startswith("minus ") else 1.0
            out.append(Literal(s, e, NUMBER, sign * words_value(words.lower().removeprefix("minus "))))
        elif group == "ordinal":
            words = m.group("ordinal").lower()
            tens, _, ones = words.rpartition("-")
            out.append(Literal(s, e, NUMBER, float(_WORD_VALUE.get(tens, 0) + _ORD_VALUE[ones])))
        elif group == "count":
            out.append(Literal(s, e, NUMBER, float(COUNT_WORDS[m.group("count").lower().split()[-1]])))
        else:
            kind = {"yes": YES, "no": NO, "zero": ZERO, "one": ONE}[group]
            out.append(Literal(s, e, kind, {YES: 1.0, NO: 0.0, ZERO: 0.0, ONE: 1.0}[kind]))
    return out


def _normal(text: str) -> str:
    return " ".join(re.split(r"[-\s_]+", text.lower())).strip()


@lru_cache(maxsize=512)
def value_matcher(phrases: tuple[tuple[str, ...], ...]) -> tuple[re.Pattern, dict[str, int]] | None:
    """One regex over every phrase of a feature's values (``phrases[k]``: value k's; whole words,
    case-insensitive, "-", "_" and spaces alike, longest first) + normalised phrase -> value index."""
    index: dict[str, int] = {}
    for k, group in enumerate(phrases):
        for p in group:
            index.setdefault(_normal(p), k)
    if not index:
        return None
    parts = [r"[-\s_]+".join(re.escape(w) for w in key.split(" ")) for key in sorted(index, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE), index


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

    def mentions(self, vocabulary: tuple[tuple[tuple[str, ...], ...], ...]) -> torch.Tensor:
        """(len(vocabulary), T) int64: per feature, the index of the value whose phrase each token is
        part of, else -1 (``vocabulary[j][k]``: the phrases of feature j's value k)."""
        out = torch.full((len(vocabulary), len(self.kinds)), -1, dtype=torch.long)
        for j, phrases in enumerate(vocabulary):
            matcher = value_matcher(phrases)
            if matcher is None:
                continue
            pattern, index = matcher
            for m in pattern.finditer(self.text):
                out[j, self.tokens_in(m.start(), m.end())] = index[_normal(m.group(0))]
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


COPY_KINDS = {"numeric": (NUMBER, ZERO, ONE), "bool": (YES, NO, ZERO), "category": ()}
"""The literal kinds each kind of feature may copy from (besides mentions of its own values)."""


def candidates(kinds: torch.Tensor, mentions: torch.Tensor, feature_kinds: list[str]) -> torch.Tensor:
    """(..., F, T) bool: the tokens each feature may point at -- literals of its kinds (:data:`COPY_KINDS`)
    and mentions of its own values. ``kinds`` (..., T), ``mentions`` (..., F, T)."""
    out = mentions >= 0
    for j, kind in enumerate(feature_kinds):
        for k in COPY_KINDS[kind]:
            out[..., j, :] |= kinds == k
    return out


@dataclass(frozen=True)
class LiteralBatch:
    """Literal channels of a batch laid out like the hidden states: kinds (B, T), values (B, T) and
    per-feature value mentions (B, F, T) for one schema's vocabulary; ``texts``: each prompt's decoded
    text (for :mod:`llamdex.meaning`)."""

    kinds: torch.Tensor
    values: torch.Tensor
    mentions: torch.Tensor
    texts: tuple[str, ...] = ()


def layout(items: list[PromptLiterals], vocabulary: tuple[tuple[tuple[str, ...], ...], ...], width: int | None = None,
           left: bool = False) -> LiteralBatch:
    """Stack prompts' literals into a batch of ``width`` columns, right-padded (as
    :meth:`PromptCache.hidden_batch`) or left-padded (as a serving batch); pads are kind NONE."""
    width = width or max(len(p.kinds) for p in items)
    kinds = torch.zeros(len(items), width, dtype=torch.long)
    values = torch.zeros(len(items), width, dtype=torch.float64)
    mentions = torch.full((len(items), len(vocabulary), width), -1, dtype=torch.long)
    for r, p in enumerate(items):
        cols = slice(width - len(p.kinds), width) if left else slice(0, len(p.kinds))
        kinds[r, cols], values[r, cols] = p.kinds, p.values
        mentions[r, :, cols] = p.mentions(vocabulary)
    return LiteralBatch(kinds, values, mentions, tuple(p.text for p in items))


def value_tokens(lits: PromptLiterals, question: str, spans: dict[str, list[tuple[int, int]]],
                 allowed: dict[str, torch.Tensor | None]) -> dict[str, list[int]]:
    """Where each feature's value (or label) is written, as token positions of the prompt: ``spans``
    are character spans in ``question`` (:meth:`llamdex.render.Question.all_spans`), located inside
    the prompt's text; ``allowed[name]`` is a (T,) mask of the tokens the feature may point at
    (:func:`candidates`), None = any token (for labels)."""
    base = lits.text.rfind(question)
    if base < 0:
        raise ValueError("question: not found verbatim in the decoded prompt; fix: use a chat template that "
                         "keeps the user message as written")
    out = {}
    for name, mask in allowed.items():
        if spans.get(name):
            tokens = {t for s, e in spans[name] for t in lits.tokens_in(base + s, base + e)}
            out[name] = [t for t in sorted(tokens) if mask is None or bool(mask[t])]
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
