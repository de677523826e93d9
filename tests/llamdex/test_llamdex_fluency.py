"""Chat to an expert on the real SmolLM2: the answer word, then the end of the turn (no noise).

Stage 2 trains what follows the forced answer token (``dec_end_weight``). Untrained, SmolLM2 goes
on after the answer with noise such as "No, no, no, no, ..." or "No. 12.2.2020 20:" (measured on
titanic validation questions: 13 % of replies fluent without the objective, 100 % with it). This
trains small connectors on the real model and fails if a chat reply is anything but fluent.
"""

from __future__ import annotations

import pytest
import torch

from llamdex.datasets import load_splits
from llamdex.evaluation import chat_replies, eval_set, fluent
from llamdex.insertion import Bundle
from llamdex.pipeline import ConnectorsConfig, train_connectors
from tests.llamdex.conftest import EXAMPLES

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def test_chat_to_an_expert_ends_its_turn_after_the_answer(smollm2):
    from cluster.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(smollm2)
    model.eval().requires_grad_(False)
    splits = load_splits("titanic", EXAMPLES / "datasets")
    cfg = ConnectorsConfig(synthetic_rows=1000, train_questions=64, stage2_questions=64, eval_questions=16,
                           enc_epochs=1, dec_epochs=8, dec_lr=3e-3, expert_epochs=2)
    trained = train_connectors(model, tok, splits.schema, model_id=smollm2.id, model_hash=smollm2.content_hash,
                               config=cfg)
    assert trained.spec.training.stage2["teacher_forced_ends_turn_after_answer"] > 0.9
    bundle = Bundle(trained.encoder, trained.decoder, trained.expert, trained.spec, trained.spec.codec())
    questions = eval_set(splits, "validation", max_rows=6, seed=1).questions
    replies = chat_replies(model, tok, bundle, questions, max_new_tokens=12)
    assert all(fluent(r, bundle.spec.class_token_strings) for r in replies), replies
