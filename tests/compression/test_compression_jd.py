"""jd: every factor-based computation checked against a brute-force dense computation."""

from __future__ import annotations

import pytest
import torch

from compression.factors import FactorStack, stack_factors
from compression.jd import (
    JDConfig,
    fit_module,
    jd_diag,
    jd_full,
    project,
    random_basis,
    reconstruction_error,
    svd_truncate,
)

D_OUT, D_IN = 40, 32


def make_stack(
    n: int = 8, ranks=(2, 3, 4, 6), seed: int = 0, d_out: int = D_OUT, d_in: int = D_IN
) -> FactorStack:
    """Random adapters with mixed ranks and norms spanning two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        scale = 10.0 ** (2 * torch.rand(1, generator=g).item() - 1)
        pairs.append((scale * torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)))
    return stack_factors(pairs, d_out, d_in)


def dense_rel_error(dW: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return ((dW - R) ** 2).sum((-2, -1)) / (dW**2).sum((-2, -1))


def non_increasing(history: list[float], rtol: float = 1e-5) -> bool:
    return all(b <= a + rtol * abs(a) for a, b in zip(history, history[1:], strict=False))


def test_norms_and_core_match_dense():
    stack = make_stack()
    dW = stack.dense()
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(D_OUT, 5, generator=g), torch.randn(D_IN, 3, generator=g)
    torch.testing.assert_close(stack.sq_norms, (dW**2).sum((1, 2)), rtol=1e-4, atol=0)
    torch.testing.assert_close(stack.core(U, V), U.T @ dW @ V, rtol=1e-4, atol=1e-3)


def test_svd_baseline_equals_dense_truncated_svd():
    stack = make_stack()
    fit = svd_truncate(stack, rank=3)
    for i, dW in enumerate(stack.dense()):
        P, s, Qh = torch.linalg.svd(dW)
        best = P[:, :3] @ torch.diag(s[:3]) @ Qh[:3]
        torch.testing.assert_close(fit.U[i] @ torch.diag(fit.s[i]) @ fit.V[i].T, best, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fit.error[i], (s[3:] ** 2).sum() / (s**2).sum(), rtol=1e-3, atol=1e-6)
    assert fit.error[0] == 0  # rank-2 adapter, rank-3 truncation: exact


def test_jd_full_sigma_is_dense_projection_on_orthonormal_bases():
    stack = make_stack()
    fit = jd_full(stack, rank=6)
    eye = torch.eye(6)
    torch.testing.assert_close(fit.U.T @ fit.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit.V.T @ fit.V, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit.sigma, fit.U.T @ stack.dense() @ fit.V, rtol=1e-4, atol=1e-3)


def test_jd_full_objective_is_non_increasing_and_equals_sum_of_errors():
    stack = make_stack(n=12)
    fit = jd_full(stack, rank=6, config=JDConfig(tol=1e-5, max_iters=300))
    assert fit.converged and len(fit.history) > 3
    assert non_increasing(fit.history)
    assert fit.history[-1] < fit.history[0]
    errors = dense_rel_error(stack.dense(), fit.U @ fit.sigma @ fit.V.T)
    assert fit.history[-1] == pytest.approx(float(errors.sum()), rel=1e-3)


def test_jd_full_beats_random_bases():
    stack = make_stack(n=10)
    fit = jd_full(stack, rank=5)
    fitted = reconstruction_error(stack, fit.U, fit.V, fit.sigma).sum()
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        U, V = random_basis(D_OUT, 5, g), random_basis(D_IN, 5, g)
        assert fitted < reconstruction_error(stack, U, V, project(stack, U, V, "full")).sum()


def test_jd_full_on_one_adapter_recovers_its_truncated_svd():
    stack = make_stack(n=1, ranks=(8,))
    fit = jd_full(stack, rank=3, config=JDConfig(tol=1e-6, max_iters=2000))
    err = reconstruction_error(stack, fit.U, fit.V, fit.sigma)
    torch.testing.assert_close(err, svd_truncate(stack, 3).error, rtol=1e-3, atol=1e-5)


def test_jd_full_is_deterministic_and_warm_start_converges_at_once():
    stack = make_stack()
    a, b = jd_full(stack, 4, seed=7), jd_full(stack, 4, seed=7)
    torch.testing.assert_close(a.U, b.U)
    warm = jd_full(stack, 4, init=(a.U, a.V))
    assert warm.converged and len(warm.history) <= 2


def test_jd_diag_sigma_is_dense_least_squares():
    stack = make_stack()
    fit = fit_module(stack, rank=5, method="diag")
    design = torch.stack([torch.outer(fit.U[:, k], fit.V[:, k]).flatten() for k in range(5)], 1)
    for i, dW in enumerate(stack.dense()):
        sigma = torch.linalg.lstsq(design.double(), dW.flatten().double()[:, None]).solution[:, 0]
        torch.testing.assert_close(fit.sigma[i].double(), sigma, rtol=1e-3, atol=1e-4)


def test_jd_diag_objective_non_increasing_and_improves_on_full_basis():
    stack = make_stack(n=10)
    full = jd_full(stack, rank=6)
    fit = jd_diag(stack, (full.U, full.V), JDConfig(diag_iters=60))
    assert non_increasing(fit.history)
    assert fit.history[-1] < 0.95 * fit.history[0]
    errors = dense_rel_error(stack.dense(), fit.U @ torch.diag_embed(fit.sigma) @ fit.V.T)
    assert fit.history[-1] == pytest.approx(float(errors.sum()), rel=1e-3)


def test_full_projection_equals_dense_least_squares_on_any_basis():
    stack = make_stack(n=4)
    g = torch.Generator().manual_seed(5)
    U, V = torch.randn(D_OUT, 4, generator=g), torch.randn(D_IN, 4, generator=g)  # not orthonormal
    sigma = project(stack, U, V, "full")
    design = torch.kron(U, V).double()  # flatten(U S Vᵀ) = (U ⊗ V) flatten(S)
    for i, dW in enumerate(stack.dense()):
        S = torch.linalg.lstsq(design, dW.flatten().double()[:, None]).solution.reshape(4, 4)
        torch.testing.assert_close(sigma[i].double(), S, rtol=1e-3, atol=1e-4)


def test_diag_projection_equals_dense_least_squares():
    stack = make_stack(n=4)
    g = torch.Generator().manual_seed(6)
    U, V = torch.randn(D_OUT, 5, generator=g), torch.randn(D_IN, 5, generator=g)
    sigma = project(stack, U, V, "diag")
    design = torch.stack([torch.outer(U[:, k], V[:, k]).flatten() for k in range(5)], 1).double()
    for i, dW in enumerate(stack.dense()):
        s = torch.linalg.lstsq(design, dW.flatten().double()[:, None]).solution[:, 0]
        torch.testing.assert_close(sigma[i].double(), s, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("diagonal", [False, True])
def test_reconstruction_error_from_factors_equals_dense(diagonal):
    stack = make_stack(n=5)
    g = torch.Generator().manual_seed(8)
    U, V = torch.randn(D_OUT, 4, generator=g), torch.randn(D_IN, 4, generator=g)
    sigma = torch.randn(5, 4, generator=g) if diagonal else torch.randn(5, 4, 4, generator=g)
    S = torch.diag_embed(sigma) if diagonal else sigma
    expected = dense_rel_error(stack.dense(), U @ S @ V.T)
    torch.testing.assert_close(reconstruction_error(stack, U, V, sigma), expected, rtol=1e-3, atol=1e-6)


def test_exact_fit_has_zero_error_not_negative():
    stack = make_stack(n=1, ranks=(3,))
    svd = svd_truncate(stack, 3)
    err = reconstruction_error(stack, svd.U[0], svd.V[0], torch.diag_embed(svd.s))
    assert 0 <= float(err[0]) < 1e-5


def test_zero_adapter_is_ignored_by_fits_and_has_zero_error():
    base = make_stack(n=5)
    with_zero = stack_factors([(b, a) for b, a in zip(base.B, base.A, strict=True)] + [None], D_OUT, D_IN)
    for method in ("full", "diag"):
        a = fit_module(base, 4, method, seed=2)
        b = fit_module(with_zero, 4, method, seed=2)
        errors = reconstruction_error(with_zero, b.U, b.V, b.sigma)
        assert torch.isfinite(errors).all() and errors[-1] == 0 and b.sigma[-1].abs().max() == 0
        assert b.history[-1] == pytest.approx(a.history[-1], rel=1e-4)


def test_invalid_rank_method_and_config_are_rejected():
    stack = make_stack()
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, min\(d_out, d_in\)=32\]"):
        jd_full(stack, 33)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_module(stack, 4, "sparse")
    with pytest.raises(ValueError, match="JDConfig.max_iters"):
        JDConfig(max_iters=0)


def test_pinv_psd_falls_back_when_eigh_fails_and_refuses_non_finite_input(monkeypatch):
    from compression.jd import pinv_psd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    m = x @ x.T  # rank 3 of 6: repeated zero eigenvalues
    want = torch.linalg.pinv(m.double(), hermitian=True).float()
    real = torch.linalg.pinv

    def eigh_fails_in_float32(a, *args, hermitian=False, **kw):
        if hermitian and a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a, *args, hermitian=hermitian, **kw)

    monkeypatch.setattr(torch.linalg, "pinv", eigh_fails_in_float32)
    got = pinv_psd(m)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4)
    monkeypatch.setattr(torch.linalg, "pinv", real)
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        pinv_psd(torch.full((3, 3), float("nan")))
