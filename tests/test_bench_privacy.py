"""bench.mia / bench.privacy_audit: the attacks find planted leakage, stay at chance without it,
and the audit runs end to end (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench import mia
from bench import privacy_audit as audit


def test_true_class_logit_binary_and_softmax():
    z = np.array([2.0, -1.0, 0.5])
    y = np.array([1, 1, 0])
    np.testing.assert_allclose(mia.true_class_logit(z, y), [2.0, -1.0, -0.5])
    logits = np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 0.5]])
    labels = np.array([1, 0])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p_y = p[np.arange(2), labels]
    np.testing.assert_allclose(mia.true_class_logit(logits, labels), np.log(p_y / (1 - p_y)))


def test_membership_puts_each_example_in_exactly_half_the_models():
    members = audit.membership(16, 101, seed=0)
    assert (members.sum(0) == 8).all() and set(members.sum(1)) == {50, 51}
    assert (members[0] != members[1]).all() and (members[0] != members[2]).any()


def _simulated(leak: float, models: int = 16, rows: int = 600, seed: int = 0):
    """phi = model offset + example difficulty + noise (+ leak if a member)."""
    rng = np.random.default_rng(seed)
    members = audit.membership(models, rows, seed + 1)
    phi = (rng.normal(size=(models, 1)) * 0.5 + rng.normal(size=(1, rows)) * 2
           + rng.normal(size=(models, rows)) * 0.3 + leak * members)
    return phi, members


@pytest.mark.parametrize("attack", ["threshold", "lira"])
def test_attacks_are_at_chance_without_leakage(attack):
    scores, labels = mia.leave_one_out(*_simulated(leak=0.0), attack)
    result = mia.bootstrap_metrics(scores, labels, reps=100)
    assert result["auc"]["lo"] < 0.5 < result["auc"]["hi"]
    assert result["tpr@0.1"]["lo"] < 0.1 < result["tpr@0.1"]["hi"]


def test_lira_finds_planted_leakage_that_the_threshold_attack_barely_sees():
    phi, members = _simulated(leak=0.3)
    lira = mia.bootstrap_metrics(*mia.leave_one_out(phi, members, "lira"), reps=100)
    threshold = mia.bootstrap_metrics(*mia.leave_one_out(phi, members, "threshold"), reps=100)
    assert lira["auc"]["lo"] > 0.5 and lira["auc"]["value"] > threshold["auc"]["value"] + 0.03


def test_metrics_match_sklearn_and_read_tpr_at_fpr():
    rng = np.random.default_rng(3)
    labels = rng.random((4, 500)) < 0.5
    scores = rng.normal(size=labels.shape) + labels
    m = mia.metrics(scores, labels)
    assert m["auc"] == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()))
    perfect = mia.metrics(np.array([[3.0, 2.0, 1.0, 0.0]]), np.array([[True, True, False, False]]))
    assert perfect == {"auc": 1.0, "tpr@0.01": 1.0, "tpr@0.1": 1.0}


def test_dp_bounds():
    assert mia.dp_tpr_bound(1.0, 0.0, 0.01) == pytest.approx(np.e * 0.01)
    assert mia.dp_tpr_bound(5.0, 1e-5, 0.01) == pytest.approx(1 - np.exp(-5) * (1 - 0.01 - 1e-5))
    assert mia.dp_tpr_bound(None, None, 0.01) == 1.0
    assert mia.dp_auc_bound(1e-9, 0.0) == pytest.approx(0.5, abs=1e-3)
    assert 0.5 < mia.dp_auc_bound(1.0, 1e-4) < mia.dp_auc_bound(5.0, 1e-4) < 1.0


@pytest.mark.slow
def test_audit_runs_end_to_end(tmp_path):
    rows = audit.main(["--datasets", "titanic", "--regimes", "overfit", "--epsilons", "none,4", "--shadows", "8",
                       "--bootstrap", "20", "--regime-overrides",
                       json.dumps({"overfit": {"pool": {"titanic": 40}, "hidden": [8], "epochs": 2}}),
                       "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert [(r["epsilon_target"], r["attack"]) for r in rows] == [(None, "threshold"), (None, "lira"),
                                                                  (4.0, "threshold"), (4.0, "lira")]
    dp = rows[2]
    assert 0 < dp["epsilon_spent"] <= 4.0 and dp["delta"] <= 1 / (10 * 20) and dp["rows_per_model"] == 20
    assert dp["dp_bound"]["tpr@0.01"] == pytest.approx(mia.dp_tpr_bound(dp["epsilon_spent"], dp["delta"], 0.01))
    saved = json.loads((tmp_path / "out" / "privacy_audit.json").read_text())
    assert len(saved["results"]) == 4 and (tmp_path / "out" / "privacy_audit.png").stat().st_size > 1000
    assert "Verdicts:" in (tmp_path / "out" / "privacy_audit.md").read_text()
    again = audit.main(["--datasets", "titanic", "--regimes", "overfit", "--epsilons", "none", "--shadows", "8",
                        "--bootstrap", "20", "--regime-overrides",
                        json.dumps({"overfit": {"pool": {"titanic": 40}, "hidden": [8], "epochs": 2}}),
                        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out2")])
    assert again[0]["metrics"] == rows[0]["metrics"]  # the cached models are re-scored, not retrained
