"""Membership-inference attacks and their metrics (plain numpy; used by bench.privacy_audit).

Scores are computed from one number per (model, example): ``phi`` = the logit of the model's
probability for the example's *true* class, log p_y - log(1 - p_y) (Carlini et al., "Membership
Inference Attacks From First Principles", 2022, §4: this scaling makes the per-example
distribution close to Gaussian). A higher score means "more likely a member".

* :func:`threshold_scores` — the loss / confidence threshold attack (Yeom et al. 2018): one
  global threshold on phi. -loss = log p_y and p_y are monotone in phi, so all three give the
  same ROC.
* :func:`lira_scores` — online LiRA: for each example, Gaussians fitted to phi of the shadow
  models that trained on it (IN) and of those that did not (OUT); the score is the log
  likelihood ratio. With few shadows per example (here ~15 each side) the paper recommends one
  global variance per side, which is what ``global_variance=True`` does; IN and OUT use equally
  many shadows per example (see :func:`lira_scores`).

Evaluation (:func:`leave_one_out`) treats every trained model in turn as the target and the
others as its shadows, so M models give M targets x N examples scored pairs, half of them
members. :func:`bootstrap_metrics` resamples *examples* (all their pairs together), so the
confidence intervals account for the same example appearing under every target.
"""

from __future__ import annotations

import numpy as np

FPRS = (0.01, 0.1)


def true_class_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) from a model's logits: (N,) binary logits (sigmoid) or (N, K)
    softmax logits; computed without forming probabilities (stable for confident models)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim == 1 or logits.shape[1] == 1:
        z = logits.reshape(-1)
        return np.where(labels == 1, z, -z)
    z_y = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    top = others.max(axis=1)
    return z_y - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def threshold_scores(phi: np.ndarray) -> np.ndarray:
    """Loss / confidence threshold attack: the score is phi itself (monotone in -loss and p_y)."""
    return np.asarray(phi, dtype=np.float64)


def _first_k(mask: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``mask`` (S, N) reduced to its first ``k[n]`` True entries in each column."""
    return mask & (np.cumsum(mask, axis=0) <= k)


def lira_scores(phi_target: np.ndarray, phi_shadow: np.ndarray, in_shadow: np.ndarray,
                global_variance: bool = True) -> np.ndarray:
    """Online LiRA log likelihood ratio for each example.

    ``phi_target`` (N,): the target model's phi; ``phi_shadow`` (S, N): the shadows' phi;
    ``in_shadow`` (S, N) bool: whether shadow s trained on example n. Every example needs at
    least one IN and one OUT shadow. Each example uses as many IN as OUT shadows (the surplus
    on one side is dropped): otherwise the side estimated from fewer models is noisier, which
    by itself moves the score (leave-one-out gives members one IN shadow fewer), and the
    attack would be biased below chance.
    """
    phi_shadow = np.asarray(phi_shadow, dtype=np.float64)
    in_shadow = np.asarray(in_shadow, dtype=bool)
    k = np.minimum(in_shadow.sum(0), (~in_shadow).sum(0))
    if (k < 1).any():
        raise ValueError("in_shadow: every example needs at least one IN and one OUT shadow model")
    use_in, use_out = _first_k(in_shadow, k), _first_k(~in_shadow, k)
    mu_in = np.where(use_in, phi_shadow, 0).sum(0) / k
    mu_out = np.where(use_out, phi_shadow, 0).sum(0) / k
    res_in = np.where(use_in, phi_shadow - mu_in, 0.0)
    res_out = np.where(use_out, phi_shadow - mu_out, 0.0)
    if global_variance:
        dof = max(1, int(k.sum() - len(k)))
        var_in = np.full_like(mu_in, (res_in ** 2).sum() / dof)
        var_out = np.full_like(mu_out, (res_out ** 2).sum() / dof)
    else:
        var_in = (res_in ** 2).sum(0) / np.maximum(1, k - 1)
        var_out = (res_out ** 2).sum(0) / np.maximum(1, k - 1)
    var_in, var_out = np.maximum(var_in, 1e-6), np.maximum(var_out, 1e-6)
    x = np.asarray(phi_target, dtype=np.float64)
    log_in = -0.5 * ((x - mu_in) ** 2 / var_in + np.log(var_in))
    log_out = -0.5 * ((x - mu_out) ** 2 / var_out + np.log(var_out))
    return log_in - log_out


def leave_one_out(phi: np.ndarray, members: np.ndarray, attack: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores and membership labels, (M, N) each: model m is the target, the others its shadows."""
    scores = np.empty_like(phi, dtype=np.float64)
    for m in range(len(phi)):
        if attack == "threshold":
            scores[m] = threshold_scores(phi[m])
        elif attack == "lira":
            rest = np.arange(len(phi)) != m
            scores[m] = lira_scores(phi[m], phi[rest], members[rest])
        else:
            raise ValueError(f"attack: unknown {attack!r}; use 'threshold' or 'lira'")
    return scores, members.astype(bool)


class _SortedRoc:
    """ROC of fixed (M, N) scores under varying model and example weights: sorts once, then each
    call is a cumulative sum."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        scores = np.atleast_2d(scores)
        m, n = scores.shape
        flat = scores.ravel()
        order = np.argsort(-flat, kind="mergesort")
        s = flat[order]
        self.labels = np.atleast_2d(labels).ravel().astype(bool)[order]
        self.model, self.example = np.divmod(order, n)
        self.last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each group of tied scores

    def __call__(self, model_w: np.ndarray | None = None, example_w: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        w = np.ones(len(self.labels))
        if model_w is not None:
            w = w * model_w[self.model]
        if example_w is not None:
            w = w * example_w[self.example]
        tp, fp = np.cumsum(w * self.labels)[self.last], np.cumsum(w * ~self.labels)[self.last]
        return np.r_[0.0, fp / max(fp[-1], 1e-12)], np.r_[0.0, tp / max(tp[-1], 1e-12)]


def _summary(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, float]:
    out = {"auc": float(np.trapezoid(tpr, fpr))}
    for target in FPRS:
        out[f"tpr@{target:g}"] = float(tpr[fpr <= target].max())
    return out


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from the highest score down, ties grouped."""
    return _SortedRoc(scores, labels)()


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC and TPR at each FPR in :data:`FPRS` (the best TPR whose FPR does not exceed it)."""
    return _summary(*roc(scores, labels))


def bootstrap_metrics(scores: np.ndarray, labels: np.ndarray, reps: int, seed: int = 0,
                      level: float = 0.95) -> dict[str, dict[str, float]]:
    """Point estimate and percentile CI of :func:`metrics` for (M, N) ``scores``/``labels``.

    Two-way bootstrap: models (rows) and examples (columns) are resampled independently, so the
    interval covers both sources of chance: which rows happened to be in the pool and how
    the (randomised) training of each model went."""
    m, n = np.shape(scores)
    curve = _SortedRoc(scores, labels)
    point = _summary(*curve())
    rng = np.random.default_rng(seed)
    draws = [_summary(*curve(np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64),
                             np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)))
             for _ in range(reps)]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: {"value": v, "lo": float(np.percentile([d[k] for d in draws], lo)),
                "hi": float(np.percentile([d[k] for d in draws], hi))} for k, v in point.items()}


def dp_tpr_bound(epsilon: float | None, delta: float | None, fpr: float) -> float:
    """The highest TPR any membership test can reach at ``fpr`` against an (epsilon, delta)-DP
    mechanism (Kairouz et al. 2015): min(e^eps fpr + delta, 1 - e^-eps (1 - fpr - delta)). 1 without DP."""
    if epsilon is None:
        return 1.0
    delta = delta or 0.0
    return float(min(1.0, np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - fpr - delta)))


def dp_auc_bound(epsilon: float | None, delta: float | None, points: int = 2001) -> float:
    """The AUC of :func:`dp_tpr_bound`'s curve: the highest AUC an attack can have under (eps, delta)-DP."""
    if epsilon is None:
        return 1.0
    fpr = np.linspace(0, 1, points)
    return float(np.trapezoid([dp_tpr_bound(epsilon, delta, f) for f in fpr], fpr))
