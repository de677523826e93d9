"""Choosing a bank for a collection: fit one (rank, clusters, method) within an error budget, measure
it, and pick the smallest of several fits.

The science of the bank sweep, without Ray: ``cluster.bank_tune`` runs :func:`fit_within_budget` +
:func:`bank_metrics` as Ray Tune trials over a grid and :func:`choose` picks the winner; the
refit (``cluster.bank_refit``) and the benchmarks call the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from compression.bank import bank_param_count, exact_param_count, mean_recon_errors
from compression.collection import compress_collection
from compression.exact import serve_within_budget


@dataclass(frozen=True)
class SweepChoice:
    """The configuration a sweep chose and what its served bank costs."""

    rank: int
    clusters: int
    method: str
    mean_error: float
    bank_params: int
    exact_adapters: int


def fit_within_budget(adapters: list, rank: int, clusters: int, method: str, budget: float, seed: int = 0,
                      model=None):
    """compress_collection + serve_within_budget: a bank serving every adapter within ``budget``.

    ``model`` (anything with ``id`` and ``content_hash``) pins the bank to its base model."""
    pin = {"base_model": model.id, "base_model_hash": model.content_hash} if model is not None else {}
    bank = compress_collection(adapters, rank=rank, clusters=min(clusters, len(adapters)), method=method,
                               seed=seed, **pin)
    return bank, serve_within_budget(bank, adapters, budget)


def bank_metrics(fitted, served, base_params: int) -> dict:
    """Size and errors of a fitted bank and of its served form (exact adapters included)."""
    fit_errors, errors = mean_recon_errors(fitted), mean_recon_errors(served)
    params = bank_param_count(served)
    return {"mean_error": sum(errors) / len(errors), "max_error": max(errors),
            "fit_mean_error": sum(fit_errors) / len(fit_errors), "fit_max_error": max(fit_errors),
            "bank_params": params, "param_ratio": params / base_params, "exact_adapters": len(served.exact),
            "exact_params": exact_param_count(served), "clusters_served": served.num_clusters}


def choose(results: list[dict]) -> SweepChoice | None:
    """The smallest bank (parameters stored, exact clusters included; ties: lower mean error)."""
    if not results:
        return None
    best = min(results, key=lambda r: (r["bank_params"], r["mean_error"]))
    return SweepChoice(best["rank"], best["clusters"], best["method"], best["mean_error"], best["bank_params"],
                       best["exact_adapters"])

