"""Expert training: learns, spends no more than the target epsilon, and reports an honest ledger."""

from __future__ import annotations

import importlib.util
import json
import math
import time
import warnings

import numpy as np
import pytest
import torch

from llamdex.codec import FeatureCodec
from llamdex.dp_training import EpochReport, default_delta, train_expert
from llamdex.expert import ExpertArch, ExpertMLP, ExpertSpec, load_expert, predict_proba, save_expert
from llamdex.synthetic import make_synthetic

pytestmark = pytest.mark.usefixtures("one_thread", "warm_torch")


@pytest.fixture(scope="module")
def warm_torch():
    """The first optimizer built in a process imports torch._dynamo (seconds); keep that out of timings."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def _cpu_seconds() -> float:
    """CPU time of this process: timing checks that other jobs on a shared box cannot make flaky."""
    return time.process_time()


def _data(toy, n=1600, classes=None):
    if classes:
        toy["target"]["classes"] = [{"name": c} for c in classes]
    df, y = make_synthetic(toy, n_rows=n, seed=0, class_sep=4.0)
    x = FeatureCodec(toy).encode(df)
    return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]


def _accuracy(model, x, y) -> float:
    return float((predict_proba(model, x).argmax(axis=1) == y).mean())


def test_no_dp_training_learns_and_says_no_dp(toy):
    xtr, ytr, xte, yte = _data(toy)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(32, 16))
    reports: list[EpochReport] = []
    start = _cpu_seconds()
    model, ledger = train_expert(xtr, ytr, arch, epsilon=None, delta=1e-3, epochs=3, batch_size=64, lr=3e-3,
                                 max_grad_norm=1.0, seed=0, progress=reports.append)
    assert _cpu_seconds() - start < 5
    assert _accuracy(model, xte, yte) > 0.85  # chance is 0.5
    assert ledger.mechanism == "none" and ledger.epsilon is None and ledger.accountant == "none"
    assert ledger.noise_multiplier == 0 and ledger.steps == 3 * 19 and ledger.epochs == 3
    assert [r.epoch for r in reports] == [1, 2, 3] and reports[-1].steps == ledger.steps
    assert reports[-1].loss < reports[0].loss and all(r.epsilon is None for r in reports)


def test_dp_training_learns_spends_at_most_the_target_and_fills_the_ledger(toy):
    xtr, ytr, xte, yte = _data(toy)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(32, 16))
    reports: list[EpochReport] = []
    start = _cpu_seconds()
    model, ledger = train_expert(xtr, ytr, arch, epsilon=1.0, delta=5e-4, epochs=2, batch_size=64, lr=1e-2,
                                 max_grad_norm=1.0, seed=0, accountant="rdp", progress=reports.append)
    assert _cpu_seconds() - start < 5
    assert _accuracy(model, xte, yte) > 0.75  # chance is 0.5
    assert ledger.mechanism == "dp-sgd" and ledger.accountant == "rdp"
    assert 0.9 < ledger.epsilon <= 1.0  # the epsilon spent, not just the target echoed
    assert ledger.target_epsilon == 1.0 and ledger.delta == 5e-4 and ledger.max_grad_norm == 1.0
    assert ledger.noise_multiplier > 0.5 and ledger.sample_rate == pytest.approx(1 / 19)
    assert ledger.steps == 2 * 19 and ledger.epochs == 2
    assert ledger.secure_rng is False and ledger.noise_rng == "fixed-seed"  # seed=0: the reproducibility mode
    assert 0 < reports[0].epsilon < reports[1].epsilon == pytest.approx(ledger.epsilon)


def test_prv_accountant_ledger(toy):
    xtr, ytr, _, _ = _data(toy, n=800)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    _, ledger = train_expert(xtr, ytr, arch, epsilon=1.0, delta=1e-3, epochs=1, batch_size=30, lr=1e-2,
                             max_grad_norm=1.0, seed=0, accountant="prv")
    assert ledger.accountant == "prv" and 0.9 < ledger.epsilon <= 1.0
    assert ledger.steps == 20 and ledger.sample_rate == pytest.approx(1 / 20) and ledger.noise_multiplier > 0


def test_smaller_epsilon_means_more_noise(toy):
    xtr, ytr, _, _ = _data(toy, n=800)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    kw = dict(delta=1e-3, epochs=1, batch_size=30, lr=1e-3, max_grad_norm=1.0, seed=0, accountant="rdp")
    _, tight = train_expert(xtr, ytr, arch, epsilon=0.5, **kw)
    _, loose = train_expert(xtr, ytr, arch, epsilon=1.0, **kw)
    assert tight.noise_multiplier > loose.noise_multiplier
    assert tight.epsilon <= 0.5


def test_empty_poisson_batches_still_take_the_noisy_step(toy):
    xtr, ytr, _, _ = _data(toy, n=16)  # 12 rows, batch 1 -> q = 1/12: empty batches are common
    arch = ExpertArch.from_schema(toy, hidden_sizes=(4,))
    reports: list[EpochReport] = []
    _, ledger = train_expert(xtr, ytr, arch, epsilon=2.0, delta=1e-2, epochs=2, batch_size=1, lr=1e-3,
                             max_grad_norm=1.0, seed=0, accountant="rdp", progress=reports.append)
    assert reports[-1].empty_batches > 0
    assert ledger.steps == 2 * 12  # every sampling round counted, empty or not
    assert ledger.epsilon <= 2.0


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_multiclass_experts_train(toy, activation):
    xtr, ytr, xte, yte = _data(toy, classes=["a", "b", "c"])
    arch = ExpertArch.from_schema(toy, hidden_sizes=(32, 16), output_activation=activation)
    model, _ = train_expert(xtr, ytr, arch, epsilon=None, delta=1e-3, epochs=3, batch_size=64, lr=3e-3,
                            max_grad_norm=1.0, seed=0)
    assert _accuracy(model, xte, yte) > 0.55  # chance is 1/3


def test_result_is_a_plain_module_that_saves_and_loads(toy, tmp_path):
    xtr, ytr, _, _ = _data(toy, n=400)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    model, ledger = train_expert(xtr, ytr, arch, epsilon=1.0, delta=1e-3, epochs=1, batch_size=30, lr=1e-3,
                                 max_grad_norm=1.0, seed=0, accountant="rdp")
    assert type(model) is ExpertMLP
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    spec = save_expert(model, ExpertSpec.build(toy, arch, ledger), tmp_path)
    loaded, loaded_spec = load_expert(tmp_path, schema=toy)
    assert loaded_spec.dp == ledger
    np.testing.assert_allclose(predict_proba(loaded, xtr), predict_proba(model, xtr), rtol=1e-6)
    assert spec.dp.epsilon == ledger.epsilon


def test_deterministic_by_seed_and_leaves_global_rng_alone(toy):
    xtr, ytr, _, _ = _data(toy, n=400)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    kw = dict(epsilon=1.0, delta=1e-3, epochs=1, batch_size=30, lr=1e-3, max_grad_norm=1.0, accountant="rdp")
    torch.manual_seed(123)
    a, _ = train_expert(xtr, ytr, arch, seed=1, **kw)
    after = torch.rand(1)
    torch.manual_seed(123)
    b, _ = train_expert(xtr, ytr, arch, seed=1, **kw)
    c, _ = train_expert(xtr, ytr, arch, seed=2, **(kw | {"epsilon": None}))
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.net.out.weight, c.net.out.weight)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epsilon": 0.0}, "epsilon: must be a finite number > 0"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta: must be in (0, 1)"),
        ({"epochs": 0}, "epochs: must be >= 1"),
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"lr": -1.0}, "lr: must be > 0"),
        ({"X": np.zeros((10, 4))}, "X: shape (10, 4), expected (N, 5)"),
        ({"y": np.full(10, 2)}, "y: class indices must be in 0..1"),
    ],
)
def test_bad_arguments_are_named(toy, kwargs, fragment):
    args = dict(X=np.zeros((10, 5)), y=np.zeros(10, dtype=int), spec_config=ExpertArch.from_schema(toy),
                epsilon=None, delta=1e-3, epochs=1, batch_size=4, lr=1e-3, max_grad_norm=1.0, seed=0)
    with pytest.raises(ValueError) as info:
        train_expert(**(args | kwargs))
    assert fragment in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("torchcsprng") is not None, reason="torchcsprng is installed")
def test_secure_mode_without_torchcsprng_says_how_to_fix(toy):
    xtr, ytr, _, _ = _data(toy, n=100)
    with pytest.raises(RuntimeError, match="secure_mode: needs the torchcsprng package.*fix"):
        train_expert(xtr, ytr, ExpertArch.from_schema(toy, hidden_sizes=(4,)), epsilon=1.0, delta=1e-3, epochs=1,
                     batch_size=10, lr=1e-3, max_grad_norm=1.0, secure_mode=True)
    with pytest.raises(ValueError, match="seed: a fixed seed makes the noise replayable"):
        train_expert(xtr, ytr, ExpertArch.from_schema(toy, hidden_sizes=(4,)), epsilon=1.0, delta=1e-3, epochs=1,
                     batch_size=10, lr=1e-3, max_grad_norm=1.0, seed=0, secure_mode=True)


def _weights(model) -> list[torch.Tensor]:
    return list(model.state_dict().values())


def test_default_noise_cannot_be_replayed_and_the_ledger_says_secure(toy, monkeypatch):
    """seed=None: every run draws fresh OS entropy (not the caller's torch seed), the noise uses
    Opacus' floating-point-robust sampler, no 'Secure RNG turned off' warning, ledger secure."""
    import opacus.optimizers.optimizer as dp_opt

    calls = []
    real = dp_opt._generate_noise
    monkeypatch.setattr(dp_opt, "_generate_noise", lambda *a, **k: calls.append(k.get("secure_mode")) or real(*a, **k))
    xtr, ytr, _, _ = _data(toy, n=400)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    kw = dict(epsilon=1.0, delta=1e-3, epochs=1, batch_size=30, lr=1e-3, max_grad_norm=1.0, accountant="rdp")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the caller's global seed must not determine the noise or the sampling
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(train_expert(xtr, ytr, arch, **kw))
        assert not [w for w in caught if "Secure RNG" in str(w.message) or "reproducibility" in str(w.message)]
    (a, ledger_a), (b, ledger_b) = runs
    assert not any(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b), strict=True))
    assert ledger_a == ledger_b  # the ledger depends on public quantities only
    assert ledger_a.secure_rng is True and ledger_a.noise_rng == "os.urandom"
    assert calls and all(calls)  # every noise draw went through the FP-robust path
    assert "seed" not in json.dumps(ledger_a.model_dump())  # nothing about the seeds is recorded


def test_fixed_seed_is_the_reproducibility_mode_and_says_so(toy):
    xtr, ytr, _, _ = _data(toy, n=400)
    arch = ExpertArch.from_schema(toy, hidden_sizes=(8,))
    kw = dict(epsilon=1.0, delta=1e-3, epochs=1, batch_size=30, lr=1e-3, max_grad_norm=1.0, accountant="rdp")
    with pytest.warns(UserWarning, match="reproducibility mode") as caught:
        a, ledger = train_expert(xtr, ytr, arch, seed=7, **kw)
    assert any("Secure RNG turned off" in str(w.message) for w in caught)  # Opacus' own warning is not hidden
    with pytest.warns(UserWarning):
        b, _ = train_expert(xtr, ytr, arch, seed=7, **kw)
    assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b), strict=True))
    assert ledger.secure_rng is False and ledger.noise_rng == "fixed-seed"


def test_no_dp_ledger_has_no_rng_claim(toy):
    xtr, ytr, _, _ = _data(toy, n=200)
    _, ledger = train_expert(xtr, ytr, ExpertArch.from_schema(toy, hidden_sizes=(4,)), epsilon=None, delta=1e-3,
                             epochs=1, batch_size=30, lr=1e-3, max_grad_norm=1.0)
    assert ledger.secure_rng is False and ledger.noise_rng is None and not ledger.is_dp


@pytest.mark.parametrize("n", [1, 9, 10, 11, 709, 1000, 1001, 36_168, 10**6])
def test_default_delta_is_at_most_a_tenth_of_one_over_n(n):
    delta = default_delta(n)
    assert delta <= 1 / (10 * n) < 10 * delta
    assert math.log10(delta) == round(math.log10(delta))  # a power of ten: does not pin n down


def test_delta_of_one_over_n_or_more_is_refused(toy):
    xtr, ytr, _, _ = _data(toy, n=400)  # 300 training rows
    with pytest.raises(ValueError, match=r"delta: 0.005 >= 1/n = 1/300.*default_delta\(300\) = 0.0001"):
        train_expert(xtr, ytr, ExpertArch.from_schema(toy, hidden_sizes=(4,)), epsilon=1.0, delta=5e-3, epochs=1,
                     batch_size=30, lr=1e-3, max_grad_norm=1.0)
