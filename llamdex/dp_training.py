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

Losses: binary (c = 1) BCE on the logit; softmax multiclass CE on the logits; sigmoid
multiclass (paper-style one-vs-rest) BCE against one-hot targets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llamdex.expert import DPLedger, ExpertArch, ExpertMLP, ExpertSpec


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
        problems.append(f"delta: must be in (0, 1) (got {delta}); fix: use about 1/len(train)")
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
    seed: int,
    secure_mode: bool = False,
    progress: Callable[[EpochReport], None] | None = None,
    accountant: Literal["rdp", "prv"] = "prv",
    optimizer: Literal["adamw", "sgd"] = "adamw",
) -> tuple[ExpertMLP, DPLedger]:
    """Train a fresh expert of ``spec_config``'s architecture on (X, y).

    Returns the plain (unwrapped, hook-free) module and the ledger with the epsilon actually
    spent. ``secure_mode`` asks Opacus for cryptographically secure noise (needs torchcsprng).
    """
    x_np = np.asarray(X, dtype=np.float32)
    y_np = np.asarray(y, dtype=np.int64)
    arch = spec_config.arch() if isinstance(spec_config, ExpertSpec) else spec_config
    _check_inputs(x_np, y_np, arch, epsilon, delta, epochs, batch_size, lr, max_grad_norm)
    # Everything below draws from a private, seeded copy of torch's global RNG (init, Opacus'
    # loader seeds): runs are reproducible by ``seed`` and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(x_np, y_np, arch, epsilon, delta, epochs, batch_size, lr, max_grad_norm, seed,
                      secure_mode, progress, accountant, optimizer)


def _train(x_np: np.ndarray, y_np: np.ndarray, arch: ExpertArch, epsilon: float | None, delta: float,
           epochs: int, batch_size: int, lr: float, max_grad_norm: float, seed: int, secure_mode: bool,
           progress: Callable[[EpochReport], None] | None, accountant: str, optimizer: str
           ) -> tuple[ExpertMLP, DPLedger]:
    model = ExpertMLP(arch)
    net = model.net  # trained on logits; the activation is applied by ExpertMLP.forward
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(net.parameters(), lr=lr)
    dataset = TensorDataset(torch.from_numpy(x_np), torch.from_numpy(y_np))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    engine = None
    if epsilon is not None:
        engine, net, opt, loader = _make_private(net, opt, loader, epsilon, delta, epochs, max_grad_norm,
                                                 accountant, secure_mode, seed)
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
                          max_grad_norm=max_grad_norm, accountant=accountant, secure_mode=secure_mode)
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
                  epochs: int, max_grad_norm: float, accountant: str, secure_mode: bool, seed: int):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise ValueError(f"spec_config: the expert has layers Opacus cannot train privately ({errors}); "
                         "fix: use the standard LayerNorm MLP")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        try:
            engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        except ImportError as e:
            raise RuntimeError("secure_mode: needs the torchcsprng package, which is not installed; "
                               "fix: install torchcsprng or pass secure_mode=False") from e
    noise_gen = None if secure_mode else torch.Generator().manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        net_p, opt_p, loader_p = engine.make_private_with_epsilon(
            module=net, optimizer=opt, data_loader=loader, target_epsilon=epsilon, target_delta=delta,
            epochs=epochs, max_grad_norm=max_grad_norm, noise_generator=noise_gen,
        )
    return engine, net_p, opt_p, loader_p
