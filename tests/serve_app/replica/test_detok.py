"""Incremental detokenization: the streamed deltas join to the full decode, stop strings cut it."""

from __future__ import annotations

import pytest

from serve_app.replica.detok import Detokenizer

TEXT = "héllo wörld ✓ 日本語 and plain ascii, then more: ünïcödé!"


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model.path)  # byte-level: multi-byte characters span tokens


def stream(tok, ids, stop=()):
    d = Detokenizer(tok, list(stop))
    deltas = []
    for i in ids:
        delta, stopped = d.push(i)
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(d.flush())
    return deltas, False


def test_deltas_join_to_the_full_decode(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT)  # some characters really span several tokens
    deltas, stopped = stream(tok, ids)
    assert "".join(deltas) == TEXT and not stopped
    assert all("\ufffd" not in d for d in deltas)  # never a half character


@pytest.mark.parametrize("stop", [["wörld"], ["日本"], ["ascii, then", "nowhere"], ["!"]])
def test_stop_strings_cut_and_never_leak(tok, stop):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    deltas, stopped = stream(tok, ids, stop)
    cut = min(TEXT.find(s) for s in stop if s in TEXT)
    assert stopped and "".join(deltas) == TEXT[:cut]


def test_special_tokens_are_skipped(tok):
    ids = tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert "".join(stream(tok, ids)[0]) == "ab"
