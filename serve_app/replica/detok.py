"""Incremental detokenization with stop strings, one object per generated row.

Decoding a row's whole text after every token costs O(length) per token; here each step decodes
only a short window (the tokens since the last emitted boundary), the way vLLM and TGI do:
``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text, held back while it
ends in an incomplete UTF-8 character (``"\\ufffd"``). Stop strings are searched only in the
tail that can contain a new match; text that could still be the start of a stop string is held
back until it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INCOMPLETE = "\ufffd"


@dataclass
class Detokenizer:
    """Turns one row's generated token ids into text deltas; ``push`` returns (delta, stopped)."""

    tokenizer: object
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    """Text decoded so far (stop strings cut off once found)."""
    emitted: int = 0
    _prefix: int = 0
    _read: int = 0

    def __post_init__(self) -> None:
        self._holdback = max([len(s) - 1 for s in self.stop] + [0])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def push(self, token: int) -> tuple[str, bool]:
        """Append a token; return the text now safe to emit and whether a stop string was hit."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            old_len = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop:
                window = max(0, old_len - self._holdback)
                cuts = [c for c in (self.text.find(s, window) for s in self.stop) if c != -1]
                if cuts:
                    self.text = self.text[:min(cuts)]
                    return self.flush(), True
        return self._ready(), False

    def _ready(self) -> str:
        ready = len(self.text) - self._holdback
        if ready <= self.emitted:
            return ""
        delta = self.text[self.emitted:ready]
        self.emitted = ready
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (call when the row finishes)."""
        tail = self._decode(self.ids[self._prefix:])
        before = self._decode(self.ids[self._prefix:self._read])
        if len(tail) > len(before):  # a trailing incomplete character: emit what the tokenizer gives
            self.text += tail[len(before):]
            self._prefix = self._read = len(self.ids)
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta
