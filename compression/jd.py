"""Joint diagonalization of one (layer, module): ΔW_i = B_i A_i ≈ U Σ_i Vᵀ with U, V shared.

Everything is computed from the factors (products like (Uᵀ B_i)(A_i V), R×R Gram matrices), never
from a dense ΔW_i. The fitted objective is Σ_i ‖ΔW_i − U Σ_i Vᵀ‖² / ‖ΔW_i‖², i.e. weights
1/‖ΔW_i‖² so every adapter counts equally; it equals the sum of the per-adapter squared relative
errors that we report. Adapters with ΔW_i = 0 get weight 0 and error 0.

- `svd_truncate`: per-adapter rank-r truncated SVD (the no-sharing baseline).
- `jd_full`: orthonormal U, V and a full r×r Σ_i (weighted subspace iteration with QR).
- `jd_diag`: unconstrained U, V and diagonal σ_i (alternating least squares from a JD-Full start).
- "lowrank": the JD-Full fit with Σ_i stored as P_i Q_iᵀ (P_i, Q_i [r, R], R = the LoRA rank):
  Σ_i = (UᵀU)⁻¹Uᵀ B_i · A_i V(VᵀV)⁻¹ has rank <= R, so P_i = (UᵀU)⁻¹UᵀB_i, Q_i = (VᵀV)⁻¹VᵀA_iᵀ is
  the same least-squares Σ_i, exactly, in 2rR numbers instead of r² (smaller once r > 2R). The
  storage idea of SHARE (arXiv 2602.06043: a large shared basis, per-adapter k×r loadings).
- `project`: closed-form best Σ_i for a (new) adapter given an existing basis.
- `reconstruction_error`: squared relative Frobenius error per adapter, from factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from compression.factors import FactorStack

Method = Literal["full", "diag", "lowrank"]
METHODS = ("full", "diag", "lowrank")


@dataclass(frozen=True)
class JDConfig:
    """Iteration budget of the fits. Defaults follow the reference code (tol 1e-3 on subspace change)."""

    max_iters: int = 100  # JD-Full subspace iterations
    tol: float = 1e-3  # JD-Full stops when max(‖U − U₀U₀ᵀU‖, same for V) / √r < tol
    diag_iters: int = 100  # JD-Diag ALS sweeps
    # Both stop when one iteration lowers the objective by less than this fraction. Needed for
    # JD-Full too: directions past the data's rank have no eigengap and rotate without end.
    obj_tol: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("max_iters", "diag_iters"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"JDConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("tol", "obj_tol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"JDConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class ModuleFit:
    """A fitted basis for one module and the coefficients of the adapters it was fitted on."""

    U: Tensor  # [d_out, r]
    V: Tensor  # [d_in, r]
    sigma: Tensor  # [n, r, r] (full) or [n, r] (diag); a lowrank fit is a full fit
    history: list[float] = field(default_factory=list)  # objective after each iteration
    converged: bool = False


@dataclass
class SVDFit:
    """Per-adapter truncated SVD: ΔW_i ≈ U_i diag(s_i) V_iᵀ with k = min(rank, r_i) columns."""

    U: Tensor  # [n, d_out, k]
    s: Tensor  # [n, k]
    V: Tensor  # [n, d_in, k]
    error: Tensor  # [n] squared relative error


def check_method(method: str) -> None:
    """Raise ValueError unless method is 'full' or 'diag'."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def check_rank(stack: FactorStack, rank: int) -> None:
    """Raise ValueError unless 1 <= rank <= min(d_out, d_in) of the module."""
    limit = min(stack.d_out, stack.d_in)
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an int in [1, min(d_out, d_in)={limit}], got {rank!r}")


def random_basis(d: int, r: int, generator: torch.Generator) -> Tensor:
    """A random d×r matrix with orthonormal columns (QR of a Gaussian)."""
    return torch.linalg.qr(torch.randn(d, r, generator=generator)).Q


def pinv_psd(m: Tensor) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (or batch): eigh in float32; if LAPACK's eigh does not
    converge or returns non-finite values, which happens on rank-deficient inputs with many repeated zero
    eigenvalues (a JD-Diag basis wider than what its cluster's adapters span, e.g. r=32 for one or two
    rank-8 adapters), eigh in float64, then SVD in float64."""
    for attempt in (lambda: torch.linalg.pinv(m, hermitian=True),
                    lambda: torch.linalg.pinv(m.double(), hermitian=True).to(m.dtype),
                    lambda: torch.linalg.pinv(m.double()).to(m.dtype)):
        try:
            out = attempt()
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(out).all()):
            return out
    raise torch.linalg.LinAlgError(f"no finite pseudo-inverse of a {tuple(m.shape)} matrix (non-finite input?)")


def _inverse_or_zero(x: Tensor) -> Tensor:
    """1/x where x > 0, else 0: the fit weights 1/‖ΔW_i‖², and "zero adapter => zero error"."""
    return torch.where(x > 0, 1 / x.clamp_min(torch.finfo(x.dtype).tiny), 0.0)


def _relative_error(sq_norms: Tensor, core: Tensor, S: Tensor, UtU: Tensor, VtV: Tensor) -> Tensor:
    """(‖ΔW‖² − 2⟨ΔW, U S Vᵀ⟩ + ‖U S Vᵀ‖²) / ‖ΔW‖², with ⟨ΔW, U S Vᵀ⟩ = Σ core∘S, clamped at 0."""
    inner = (core * S).sum((1, 2))
    recon = (UtU @ S @ VtV * S).sum((1, 2))
    return (sq_norms - 2 * inner + recon).clamp_min(0) * _inverse_or_zero(sq_norms)


def sigma_matrix(sigma: Tensor, method: Method | None = None) -> Tensor:
    """Dense Σ_i [n, r, r] from a stored sigma: [n, r] (diag), [n, r, r] (full) or [n, r, 2R] (lowrank:
    P | Q, Σ = P Qᵀ). `method` None infers full/diag from the shape."""
    if method == "lowrank":
        R = sigma.shape[-1] // 2
        return sigma[..., :R] @ sigma[..., R:].mT
    return torch.diag_embed(sigma) if method == "diag" or sigma.dim() == 2 else sigma


def pad_core(sigma: Tensor, R: int) -> Tensor:
    """A lowrank sigma [n, r, 2R₀] with its P and Q halves zero-padded to R >= R₀ columns each (exact)."""
    R0 = sigma.shape[-1] // 2
    if R <= R0:
        return sigma
    pad = (0, R - R0)
    return torch.cat([torch.nn.functional.pad(sigma[..., :R0], pad), torch.nn.functional.pad(sigma[..., R0:], pad)], -1)


def reconstruction_error(
    stack: FactorStack, U: Tensor, V: Tensor, sigma: Tensor, method: Method | None = None
) -> Tensor:
    """Squared relative Frobenius error ‖ΔW_i − U Σ_i Vᵀ‖² / ‖ΔW_i‖² per adapter, from factors. [n]

    sigma is [n, r, r] (full), [n, r] (diag) or [n, r, 2R] (lowrank, pass `method`). Works for any U, V.
    """
    return _relative_error(stack.sq_norms, stack.core(U, V), sigma_matrix(sigma, method), U.mT @ U, V.mT @ V)


def _solve_sigma(core: Tensor, UtU: Tensor, VtV: Tensor, method: Method) -> Tensor:
    if method == "diag":
        return core.diagonal(dim1=1, dim2=2) @ pinv_psd(UtU * VtV)
    return pinv_psd(UtU) @ core @ pinv_psd(VtV)


def _lowrank_sigma(stack: FactorStack, U: Tensor, V: Tensor, UtU: Tensor, VtV: Tensor) -> Tensor:
    """P | Q [n, r, 2R]: P = (UᵀU)⁻¹UᵀB_i, Q = (VᵀV)⁻¹VᵀA_iᵀ, so P Qᵀ is the full least-squares Σ_i."""
    P = pinv_psd(UtU) @ (U.mT @ stack.B)
    Q = pinv_psd(VtV) @ (stack.A @ V).mT
    return torch.cat([P, Q], dim=-1)


def project(stack: FactorStack, U: Tensor, V: Tensor, method: Method) -> Tensor:
    """Closed-form least-squares Σ_i of each adapter on a fixed basis (how a new adapter is added).

    full: Σ_i = (UᵀU)⁻¹ Uᵀ ΔW_i V (VᵀV)⁻¹, which is Uᵀ ΔW_i V for orthonormal U, V. [n, r, r]
    diag: σ_i = [(UᵀU)∘(VᵀV)]⁻¹ diag(Uᵀ ΔW_i V). [n, r]
    lowrank: the full Σ_i as P_i | Q_i. [n, r, 2R]
    """
    return project_with_error(stack, U, V, method)[0]


def project_with_error(stack: FactorStack, U: Tensor, V: Tensor, method: Method) -> tuple[Tensor, Tensor]:
    """`project` and `reconstruction_error` of the result, sharing one pass over the factors."""
    check_method(method)
    core, UtU, VtV = stack.core(U, V), U.mT @ U, V.mT @ V
    if method == "lowrank":
        sigma = _lowrank_sigma(stack, U, V, UtU, VtV)
        return sigma, _relative_error(stack.sq_norms, core, sigma_matrix(sigma, method), UtU, VtV)
    sigma = _solve_sigma(core, UtU, VtV, method)
    return sigma, _relative_error(stack.sq_norms, core, sigma_matrix(sigma, method), UtU, VtV)


def svd_truncate(stack: FactorStack, rank: int) -> SVDFit:
    """Per-adapter rank-`rank` truncated SVD via QR of each factor and an R×R SVD (baseline, no sharing)."""
    check_rank(stack, rank)
    Qb, Rb = torch.linalg.qr(stack.B)  # B = Qb Rb
    Qa, Ra = torch.linalg.qr(stack.A.mT)  # Aᵀ = Qa Ra, so ΔW = Qb (Rb Raᵀ) Qaᵀ
    P, s, Wh = torch.linalg.svd(Rb @ Ra.mT)
    k = min(rank, s.shape[1])
    error = (s[:, k:] ** 2).sum(1) * _inverse_or_zero((s**2).sum(1))
    return SVDFit(U=Qb @ P[..., :k], s=s[:, :k], V=Qa @ Wh.mT[..., :k], error=error)


def _plateaued(history: list[float], obj_tol: float) -> bool:
    return len(history) >= 2 and history[-2] - history[-1] <= obj_tol * max(history[-2], 1e-30)


def _subspace_change(old: Tensor, new: Tensor) -> float:
    return float(torch.linalg.matrix_norm(new - old @ (old.mT @ new)) / new.shape[1] ** 0.5)


def jd_full(
    stack: FactorStack,
    rank: int,
    config: JDConfig | None = None,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> ModuleFit:
    """JD-Full: orthonormal U, V maximising Σ_i w_i ‖Uᵀ ΔW_i V‖², then Σ_i = Uᵀ ΔW_i V.

    Weighted subspace iteration: U ← qr(Σ_i w_i ΔW_i V Vᵀ ΔW_iᵀ U), then the same for V, with
    w_i = 1/‖ΔW_i‖². `init` (any full-rank bases, e.g. a previous fit) warm-starts; otherwise
    random orthonormal bases from `seed`. Stops when both subspaces move by less than config.tol
    or the objective plateaus (config.obj_tol).
    """
    config = config or JDConfig()
    check_rank(stack, rank)
    if init is None:
        g = torch.Generator().manual_seed(seed)
        U, V = random_basis(stack.d_out, rank, g), random_basis(stack.d_in, rank, g)
    elif init[0].shape != (stack.d_out, rank) or init[1].shape != (stack.d_in, rank):
        raise ValueError(
            f"init bases must be U [{stack.d_out}, {rank}] and V [{stack.d_in}, {rank}], got "
            f"{tuple(init[0].shape)} and {tuple(init[1].shape)}"
        )
    else:
        U, V = torch.linalg.qr(init[0]).Q, torch.linalg.qr(init[1]).Q
    sq = stack.sq_norms
    w = _inverse_or_zero(sq)
    B, A = stack.B, stack.A
    fit = ModuleFit(U=U, V=V, sigma=stack.core(U, V), converged=not bool((w > 0).any()))
    AV = A @ V  # [n, R, r]
    for _ in range(0 if fit.converged else config.max_iters):
        BtU = B.mT @ U  # [n, R, r]
        U_new = torch.linalg.qr(stack.sum_B(AV @ (AV.mT @ BtU), w)).Q
        BtU = B.mT @ U_new
        V_new = torch.linalg.qr(stack.sum_At(BtU @ (BtU.mT @ AV), w)).Q
        AV = A @ V_new
        change = max(_subspace_change(U, U_new), _subspace_change(V, V_new))
        U, V = U_new, V_new
        core = BtU.mT @ AV
        fit.history.append(float((w * (sq - (core**2).sum((1, 2)))).clamp_min(0).sum()))
        if change < config.tol or _plateaued(fit.history, config.obj_tol):
            fit.converged = True
            break
    fit.U, fit.V, fit.sigma = U, V, stack.core(U, V)
    return fit


def jd_diag(stack: FactorStack, init: tuple[Tensor, Tensor], config: JDConfig | None = None) -> ModuleFit:
    """JD-Diag: ΔW_i ≈ U diag(σ_i) Vᵀ with unconstrained U, V, by alternating least squares.

    Starting from `init` (normally the JD-Full U, V), each sweep solves exactly for U given
    (σ, V), for V given (σ, U), rescales columns of U and V to unit norm (a gauge choice that
    keeps (UᵀU)∘(VᵀV) well conditioned), then solves for σ. The weighted objective never
    increases; stops after config.diag_iters sweeps or when it drops by < config.obj_tol (relative).
    """
    config = config or JDConfig()
    U, V = init
    w = _inverse_or_zero(stack.sq_norms)
    B, A = stack.B, stack.A
    sigma, errors = project_with_error(stack, U, V, "diag")
    fit = ModuleFit(U=U, V=V, sigma=sigma, history=[float(errors.sum())], converged=not bool((w > 0).any()))
    for _ in range(0 if fit.converged else config.diag_iters):
        ss = (w[:, None] * sigma).T @ sigma  # Σ_i w_i σ_i σ_iᵀ
        num = stack.sum_B((A @ V) * sigma[:, None, :], w)  # Σ_i w_i ΔW_i V D_i
        U = num @ pinv_psd((V.mT @ V) * ss)
        num = stack.sum_At((B.mT @ U) * sigma[:, None, :], w)  # Σ_i w_i ΔW_iᵀ U D_i
        V = num @ pinv_psd((U.mT @ U) * ss)
        U = U / U.norm(dim=0).clamp_min(1e-30)
        V = V / V.norm(dim=0).clamp_min(1e-30)
        sigma, errors = project_with_error(stack, U, V, "diag")
        fit.history.append(float(errors.sum()))
        if _plateaued(fit.history, config.obj_tol):
            fit.converged = True
            break
    fit.U, fit.V, fit.sigma = U, V, sigma
    return fit


def fit_module(
    stack: FactorStack,
    rank: int,
    method: Method,
    config: JDConfig | None = None,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> ModuleFit:
    """Fit one module with the chosen method.

    full, lowrank: JD-Full. diag: JD-Diag ALS started from a JD-Full fit, or directly from `init` when
    given. `init` is a previous fit's (U, V) of the same method (warm start, e.g. between
    clustering rounds), so refitting after a small membership change is cheap.
    """
    check_method(method)
    if method in ("full", "lowrank"):  # lowrank stores the JD-Full Σ_i factored, same bases
        return jd_full(stack, rank, config, init=init, seed=seed)
    if init is None:
        full = jd_full(stack, rank, config, seed=seed)
        init = (full.U, full.V)
    return jd_diag(stack, init, config)
