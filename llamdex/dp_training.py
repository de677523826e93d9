"""Train an expert on a tenant's encoded table, with DP-SGD (Opacus) or without DP.

Plain torch: the Ray job calls :func:`train_expert` inside a worker and reports through the
``progress`` callback. With a finite ``epsilon`` we use Opacus ``make_private_with_epsilon``
(Poisson sampling, per-sample clipping at ``max_grad_norm``, noise calibrated so that after
``epochs`` the accountant's epsilon stays within the target). ``epsilon=None`` trains without
DP and the ledger says so (mechanism/accountant 'none', epsilon null = infinity).

Empty Poisson batches: no loss is computed for them (there is nothing to learn from), but the
noisy optimizer step is still taken. Skipping the step outright would make the number of
noisy updates depend on the sampling outcome, i.e. the released weights would no longer be the
mechanism the accountant charges for; with the step kept, ledger steps = planned steps.

Randomness (what an attacker could replay). The DP guarantee assumes the attacker cannot
predict the Gaussian noise nor which rows each Poisson batch holds. So by default (``seed=None``)
every run draws fresh seeds from ``os.urandom`` for the noise generator and for torch's RNG (Poisson
sampling, initialisation), never stores or returns them, and asks Opacus for its floating-point-
attack-resistant noise (the sum of four Gaussians, as its secure_mode does); the ledger says
``secure_rng: true, noise_rng: "os.urandom"``. ``secure_mode=True`` uses Opacus' own secure_mode
(a torchcsprng stream); torchcsprng has no build for this torch/Python, so it fails with a fix.
An integer ``seed`` is the explicit reproducibility mode (tests, benchmarks): noise and sampling
follow from the seed, Opacus' "Secure RNG turned off" warning is left on, a warning says what
it means, and the ledger records ``secure_rng: false, noise_rng: "fixed-seed"``.

delta: :func:`default_delta` gives the largest power of ten <= 1/(10 n); ``train_expert`` refuses
delta >= 1/n (a mechanism with such a delta may publish a whole row).

Losses: binary (c = 1) BCE on the logit; softmax multiclass CE on the logits; sigmoid
multiclass (paper-style one-vs-rest) BCE against one-hot targets.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llamdex.expert import DPLedger, ExpertArch, ExpertMLP, ExpertSpec
from llamdex.expert_spec import SECURE_NOISE_RNGS, NoiseRng


@dataclass(frozen=True)
class EpochReport:
    """Passed to ``progress`` after every epoch."""

    epoch: int  # 1-based
    epochs: int
    loss: float  # mean training loss over the non-empty batches of this epoch
    steps: int  # optimizer steps so far
    epsilon: float | None  # epsilon spent so far (None without DP)
    empty_batches: int = 0  # empty Poisson batches so far (noise-only steps)


def _loss_fn(arch: ExpertArch) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if arch.output_size == 1:
        bce = nn.BCEWithLogitsLoss()
        return lambda z, y: bce(z[:, 0], y.float())
    if arch.output_activation == "softmax":
        return nn.CrossEntropyLoss()
    bce = nn.BCEWithLogitsLoss()
    return lambda z, y: bce(z, nn.functional.one_hot(y, arch.output_size).float())


def default_delta(n_rows: int) -> float:
    """The default delta for ``n_rows`` training rows: the largest power of ten <= 1/(10 n).

    delta well below 1/n is the usual requirement (delta = 1/n allows publishing a random row);
    rounding to a power of ten also keeps the published delta from pinning down n.
    """
    if n_rows < 1:
        raise ValueError(f"n_rows: must be >= 1 (got {n_rows})")
    k = len(str(10 * n_rows - 1))  # 10**k >= 10 n  (integer arithmetic: no float edge cases)
    return float(f"1e-{k}")


def _os_seed() -> int:
    """64 fresh bits from the OS CSPRNG; used once, never stored."""
    return int.from_bytes(os.urandom(8), "little")


def _check_inputs(x: np.ndarray, y: np.ndarray, arch: ExpertArch, epsilon: float | None, delta: float,
                  epochs: int, batch_size: int, lr: float, max_grad_norm: float) -> None:
    k = 2 if arch.output_size == 1 else arch.output_size
    problems = []
    if x.ndim != 2 or x.shape[1] != arch.input_size:
        problems.append(f"X: shape {x.shape}, expected (N, {arch.input_size}); fix: encode rows with the "
                        "schema's FeatureCodec")
    if not np.isfinite(x).all():
        problems.append("X: contains NaN/inf; fix: encode with FeatureCodec (it never produces them)")
    if y.ndim != 1 or len(y) != len(x):
        problems.append(f"y: shape {y.shape}, expected ({len(x)},); fix: one class index per row")
    elif len(y) and (y.min() < 0 or y.max() >= k):
        problems.append(f"y: class indices must be in 0..{k - 1}; fix: use FeatureCodec.encode_labels")
    if len(x) < 2:
        problems.append(f"X: {len(x)} rows; fix: train on at least 2 rows")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
        problems.append(f"epsilon: must be a finite number > 0 or None for no DP (got {epsilon})")
    if epsilon is not None and not 0 < delta < 1:
        problems.append(f"delta: must be in (0, 1) (got {delta}); fix: use default_delta(len(X))")
    elif epsilon is not None and len(x) and delta * len(x) >= 1:
        problems.append(f"delta: {delta:g} >= 1/n = 1/{len(x)}: with such a delta the mechanism may publish a "
                        f"whole row; fix: use delta <= 1/(10 n), e.g. default_delta({len(x)}) = "
                        f"{default_delta(len(x)):g}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            problems.append(f"{name}: must be >= 1 (got {value})")
    for name, fvalue in (("lr", lr), ("max_grad_norm", max_grad_norm)):
        if not fvalue > 0:
            problems.append(f"{name}: must be > 0 (got {fvalue})")
    if problems:
        raise ValueError("cannot train expert:\n  " + "\n  ".join(problems))


def train_expert(
    X: np.ndarray,
    y: np.ndarray,
    spec_config: ExpertArch | ExpertSpec,
    epsilon: float | None,
    delta: float,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    seed: int | None = None,
    secure_mode: bool = False,
    progress: Callable[[EpochReport], None] | None = None,
    accountant: Literal["rdp", "prv"] = "prv",
    optimizer: Literal["adamw", "sgd"] = "adamw",
) -> tuple[ExpertMLP, DPLedger]:
    """Train a fresh expert of ``spec_config``'s architecture on (X, y).

    Returns the plain (unwrapped, hook-free) module and the ledger with the epsilon actually
    spent. ``seed=None`` (default): noise and sampling from fresh ``os.urandom`` seeds, never
    recorded (``secure_rng`` true). An int ``seed``: reproducible and *not* secure (the ledger
    says so). ``secure_mode=True``: Opacus' secure_mode (needs torchcsprng; not with a seed).
    """
    x_np = np.asarray(X, dtype=np.float32)
    y_np = np.asarray(y, dtype=np.int64)
    arch = spec_config.arch() if isinstance(spec_config, ExpertSpec) else spec_config
    _check_inputs(x_np, y_np, arch, epsilon, delta, epochs, batch_size, lr, max_grad_norm)
    if secure_mode and seed is not None:
        raise ValueError("seed: a fixed seed makes the noise replayable, which secure_mode exists to prevent; "
                         "fix: pass seed=None with secure_mode=True")
    rng: NoiseRng = "fixed-seed" if seed is not None else "torchcsprng" if secure_mode else "os.urandom"
    if seed is not None and epsilon is not None:
        warnings.warn(f"train_expert(seed={seed}): reproducibility mode. The DP-SGD noise and Poisson sampling "
                      "follow from this seed, so anyone who knows it can replay them and the accountant's "
                      "epsilon does not describe what they learn; the ledger records secure_rng=false. Use "
                      "seed=None for an expert that is published.", UserWarning, stacklevel=2)
    # Everything below draws from a private copy of torch's global RNG (init, Opacus' Poisson
    # sampling): seeded by ``seed`` or by fresh OS entropy; the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_os_seed() if seed is None else seed)
        return _train(x_np, y_np, arch, epsilon, delta, epochs, batch_size, lr, max_grad_norm, seed,
                      rng, progress, accountant, optimizer)


def _train(x_np: np.ndarray, y_np: np.ndarray, arch: ExpertArch, epsilon: float | None, delta: float,
           epochs: int, batch_size: int, lr: float, max_grad_norm: float, seed: int | None, rng: NoiseRng,
           progress: Callable[[EpochReport], None] | None, accountant: str, optimizer: str
           ) -> tuple[ExpertMLP, DPLedger]:
    model = ExpertMLP(arch)
    net = model.net  # trained on logits; the activation is applied by ExpertMLP.forward
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(net.parameters(), lr=lr)
    dataset = TensorDataset(torch.from_numpy(x_np), torch.from_numpy(y_np))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(_os_seed() if seed is None else seed))
    engine = None
    if epsilon is not None:
        engine, net, opt, loader = _make_private(net, opt, loader, epsilon, delta, epochs, max_grad_norm,
                                                 accountant, rng, seed)
    loss_fn = _loss_fn(arch)
    net.train()
    with warnings.catch_warnings():
        # Opacus' per-sample hooks trigger torch's "Full backward hook is firing ..." notice
        # because the inputs (data) do not require grad; that is expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        steps = _run_epochs(net, opt, loader, loss_fn, epochs, engine, delta, progress)
    trained = ExpertMLP(arch)  # fresh module: no Opacus hooks or grad_sample attributes
    source = net._module if hasattr(net, "_module") else net
    trained.net.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
    trained.eval()
    if engine is None:
        ledger = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0.0,
                          sample_rate=min(1.0, batch_size / len(x_np)), steps=steps, epochs=epochs,
                          accountant="none")
    else:
        ledger = DPLedger(mechanism="dp-sgd", epsilon=float(engine.get_epsilon(delta)), target_epsilon=epsilon,
                          delta=delta, noise_multiplier=float(opt.noise_multiplier),
                          sample_rate=float(loader.sample_rate), steps=steps, epochs=epochs,
                          max_grad_norm=max_grad_norm, accountant=accountant,
                          secure_rng=rng in SECURE_NOISE_RNGS, noise_rng=rng)
    return trained, ledger


def _run_epochs(net: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int, engine, delta: float,
                progress: Callable[[EpochReport], None] | None) -> int:
    steps = empty = 0
    for epoch in range(1, epochs + 1):
        losses = []
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            if len(xb) == 0:  # empty Poisson batch: no data term, but the noisy step is still taken
                (net(xb).sum() * 0.0).backward()
                empty += 1
            else:
                loss = loss_fn(net(xb), yb)
                loss.backward()
                losses.append(float(loss.detach()))
            opt.step()
            steps += 1
        if progress is not None:
            spent = float(engine.get_epsilon(delta)) if engine is not None else None
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            progress(EpochReport(epoch, epochs, mean_loss, steps, spent, empty))
    return steps


def _make_private(net: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, epsilon: float, delta: float,
                  epochs: int, max_grad_norm: float, accountant: str, rng: NoiseRng, seed: int | None):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"spec_config: the expert has layers Opacus cannot train privately ({errors}); "
                         "fix: use the standard LayerNorm MLP")
    with warnings.catch_warnings():
        if rng == "os.urandom":
            # Opacus warns whenever its own secure_mode is off; here the noise and the sampling
            # come from unrecorded OS-entropy seeds instead (and FP-robust noise is switched on
            # below), so the warning would be wrong. The fixed-seed mode keeps it.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            engine = PrivacyEngine(accountant=accountant, secure_mode=rng == "torchcsprng")
        except ImportError as e:
            raise RuntimeError("secure_mode: needs the torchcsprng package, which is not installed (and has no "
                               "build for this torch/Python); fix: pass secure_mode=False, the default noise "
                               "source (fresh os.urandom seeds, never recorded) is used then") from e
    noise_gen = None
    if rng != "torchcsprng":
        noise_gen = torch.Generator().manual_seed(_os_seed() if seed is None else seed + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        net_p, opt_p, loader_p = engine.make_private_with_epsilon(
            module=net, optimizer=opt, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
            epochs=epochs, max_grad_norm=max_grad_norm, noise_generator=noise_gen,
        )
    if rng == "os.urandom":
        # Opacus' defence against floating-point attacks on Gaussian sampling (each noise draw is
        # the sum of four, arXiv 2107.10138 s5.1), which its secure_mode switches on with the CSPRNG.
        opt_p.secure_mode = True
    return engine, net_p, opt_p, loader_p
