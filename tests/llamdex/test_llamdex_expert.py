"""Expert: architecture, probabilities, save/load round trip and every refusal."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llamdex.expert import (
    EXPERT_JSON,
    EXPERT_WEIGHTS,
    DPLedger,
    ExpertArch,
    ExpertError,
    ExpertSpec,
    build_expert,
    load_expert,
    predict_proba,
    save_expert,
)
from llamdex.schema import load_schema

NO_DP = DPLedger(mechanism="none", epsilon=None, noise_multiplier=0.0, sample_rate=0.1, steps=10, epochs=1,
                 accountant="none")
DP = DPLedger(mechanism="dp-sgd", epsilon=0.98, target_epsilon=1.0, delta=1e-3, noise_multiplier=1.1,
              sample_rate=0.09, steps=110, epochs=10, max_grad_norm=1.0, accountant="prv")


def _multiclass(toy: dict) -> dict:
    toy["target"]["classes"] = [{"name": n} for n in ("low", "mid", "high")]
    return toy


@pytest.fixture
def saved(toy, tmp_path):
    """A small saved binary expert: (dir, model, spec, schema)."""
    schema = load_schema(toy)
    arch = ExpertArch.from_schema(schema, hidden_sizes=(8, 4))
    torch.manual_seed(0)
    model = build_expert(arch)
    spec = save_expert(model, ExpertSpec.build(schema, arch, DP), tmp_path / "e")
    return tmp_path / "e", model, spec, schema


def test_paper_architecture(toy):
    arch = ExpertArch.from_schema(toy)
    assert (arch.input_size, arch.output_size, arch.hidden_sizes, arch.output_activation) == (5, 1, [400, 200],
                                                                                              "sigmoid")
    layers = [type(m).__name__ for m in build_expert(arch).net]
    assert layers == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU", "Linear"]
    multi = ExpertArch.from_schema(_multiclass(toy))
    assert (multi.output_size, multi.output_activation) == (3, "softmax")
    with pytest.raises(ValueError, match="output_activation"):
        ExpertArch(input_size=3, output_size=1, output_activation="softmax")


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_predict_proba_gives_every_class(toy, activation):
    binary = build_expert(ExpertArch.from_schema(toy))
    x = np.random.default_rng(0).random((6, 5), dtype=np.float32)
    p = predict_proba(binary, x)
    assert p.shape == (6, 2)
    np.testing.assert_allclose(p[:, 1], binary(torch.from_numpy(x))[:, 0].detach().numpy(), rtol=1e-6)
    multi = build_expert(ExpertArch.from_schema(_multiclass(toy), output_activation=activation))
    pm = predict_proba(multi, torch.from_numpy(x))
    assert pm.shape == (6, 3) and (pm >= 0).all()
    np.testing.assert_allclose(pm.sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 5\)"):
        predict_proba(multi, x[:, :4])


def test_round_trip(saved):
    directory, model, spec, schema = saved
    assert sorted(p.name for p in directory.iterdir()) == [EXPERT_JSON, EXPERT_WEIGHTS]
    on_disk = json.loads((directory / EXPERT_JSON).read_text())
    assert on_disk["dp"]["epsilon"] == 0.98 and on_disk["feature_order"] == ["age", "fare", "sex", "alone"]
    assert on_disk["schema_sha256"] == schema.sha256() and on_disk["weights_sha256"] == spec.weights_sha256
    assert set(load_file(directory / EXPERT_WEIGHTS)) == set(spec.arch().tensor_shapes())
    loaded, loaded_spec = load_expert(directory, schema=schema)
    assert loaded_spec == spec
    x = torch.rand(5, 5)
    torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_no_dp_ledger_round_trips_as_null_epsilon(toy, tmp_path):
    schema = load_schema(toy)
    arch = ExpertArch.from_schema(schema, hidden_sizes=(4,))
    save_expert(build_expert(arch), ExpertSpec.build(schema, arch, NO_DP), tmp_path)
    dp = json.loads((tmp_path / EXPERT_JSON).read_text())["dp"]
    assert dp["epsilon"] is None and dp["mechanism"] == "none" and dp["accountant"] == "none"
    assert load_expert(tmp_path)[1].dp == NO_DP


def _rewrite_weights(directory: Path, tensors: dict) -> None:
    """Replace the weights and re-sign them, so only the tensor check can catch the problem."""
    save_file(tensors, directory / EXPERT_WEIGHTS)
    import hashlib

    spec = json.loads((directory / EXPERT_JSON).read_text())
    spec["weights_sha256"] = hashlib.sha256((directory / EXPERT_WEIGHTS).read_bytes()).hexdigest()
    (directory / EXPERT_JSON).write_text(json.dumps(spec))


def _problems(directory, schema=None) -> list[str]:
    with pytest.raises(ExpertError) as info:
        load_expert(directory, schema=schema)
    assert all("fix" in p for p in info.value.problems), info.value.problems
    return info.value.problems


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.pop("ln1.weight"), "[ln1.weight]: missing tensor"),
        (lambda t: t.update({"fc1.weight": torch.zeros(8, 6)}), "[fc1.weight]: shape [8, 6] but the spec implies [8, 5]"),
        (lambda t: t["out.bias"].fill_(float("nan")), "[out.bias]: contains NaN"),
        (lambda t: t["fc2.weight"].fill_(float("inf")), "[fc2.weight]: contains NaN or infinite"),
        (lambda t: t.update({"fc1.bias": torch.zeros(8, dtype=torch.int32)}), "[fc1.bias]: dtype torch.int32"),
        (lambda t: t.update({"extra": torch.zeros(1)}), "[extra]: unexpected tensor"),
    ],
)
def test_bad_tensors_are_refused_by_name(saved, edit, fragment):
    directory = saved[0]
    tensors = load_file(directory / EXPERT_WEIGHTS)
    edit(tensors)
    _rewrite_weights(directory, tensors)
    problems = _problems(directory)
    assert any(fragment in p for p in problems), problems


def test_float16_weights_are_accepted(saved):
    directory = saved[0]
    _rewrite_weights(directory, {k: v.half() for k, v in load_file(directory / EXPERT_WEIGHTS).items()})
    model, _ = load_expert(directory)
    assert next(model.parameters()).dtype == torch.float32


def test_weights_from_another_save_are_refused(saved, toy, tmp_path):
    directory, _, _, schema = saved
    arch = ExpertArch.from_schema(schema, hidden_sizes=(8, 4))
    other = tmp_path / "other"
    save_expert(build_expert(arch), ExpertSpec.build(schema, arch, DP), other)
    (directory / EXPERT_WEIGHTS).write_bytes((other / EXPERT_WEIGHTS).read_bytes())
    assert "SHA-256" in _problems(directory)[0]


def test_garbage_weights_file_is_refused(saved):
    directory = saved[0]
    (directory / EXPERT_WEIGHTS).write_bytes(b"\x00not safetensors")
    _rewrite_weights_hash_only(directory)
    assert "not a readable safetensors file" in _problems(directory)[0]


def _rewrite_weights_hash_only(directory: Path) -> None:
    import hashlib

    spec = json.loads((directory / EXPERT_JSON).read_text())
    spec["weights_sha256"] = hashlib.sha256((directory / EXPERT_WEIGHTS).read_bytes()).hexdigest()
    (directory / EXPERT_JSON).write_text(json.dumps(spec))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["features"].pop(), "feature_order"),
        (lambda d: d["features"][2].update(categories=["female", "male"]), "input_columns"),
        (lambda d: d["features"][2]["categories"].append("other"), "input_size"),
        (lambda d: d["target"]["classes"].append({"name": "maybe"}), "output_size"),
        (lambda d: d["target"]["classes"][1].update(name="alive"), "class_names"),
        (lambda d: d.update(name="titanic2"), "schema_name"),
    ],
)
def test_schema_mismatch_is_refused(saved, toy, mutate, fragment):
    directory = saved[0]
    mutate(toy)
    problems = _problems(directory, schema=toy)
    assert any(p.startswith(f"{EXPERT_JSON}.{fragment}:") for p in problems), problems


def test_description_edits_do_not_invalidate_an_expert(saved, toy):
    toy["features"][0]["description"] = "how old the passenger was"
    load_expert(saved[0], schema=toy)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda s: s.update(input_size=6), "input_columns"),
        (lambda s: s.update(output_size=2), "output_size"),
        (lambda s: s.update(hidden_sizes=[0, 4]), "hidden_sizes[0]"),
        (lambda s: s.update(input_size=10**9), "input_size"),
        (lambda s: s["dp"].update(epsilon=None), "dp.epsilon"),
        (lambda s: s["dp"].update(accountant="none"), "dp.accountant"),
        (lambda s: s.update(format_version=2), "format_version"),
        (lambda s: s.update(wieghts="x"), "wieghts"),
        (lambda s: s.pop("weights_sha256"), "weights_sha256"),
    ],
)
def test_bad_spec_fields_are_refused_by_name(saved, edit, fragment):
    directory = saved[0]
    spec = json.loads((directory / EXPERT_JSON).read_text())
    edit(spec)
    (directory / EXPERT_JSON).write_text(json.dumps(spec))
    problems = _problems(directory)
    assert any(p.startswith(f"{EXPERT_JSON}.{fragment}:") for p in problems), problems


@pytest.mark.parametrize(
    ("base", "update", "fragment"),
    [
        (NO_DP, {"epsilon": 1.0}, "epsilon"),
        (NO_DP, {"accountant": "rdp"}, "accountant"),
        (NO_DP, {"noise_multiplier": 0.5}, "noise_multiplier"),
        (DP, {"delta": 2.0}, "delta"),
        (DP, {"epsilon": float("inf")}, "epsilon"),
        (DP, {"noise_multiplier": 0.0}, "noise_multiplier"),
        (DP, {"max_grad_norm": None}, "max_grad_norm"),
        (NO_DP, {"secure_rng": True}, "secure_rng"),
        (NO_DP, {"noise_rng": "os.urandom"}, "noise_rng"),
        (DP, {"secure_rng": True, "noise_rng": "fixed-seed"}, "secure_rng"),
        (DP, {"secure_rng": False, "noise_rng": "os.urandom"}, "secure_rng"),
        (DP, {"noise_rng": "mt19937"}, "noise_rng"),
    ],
)
def test_ledger_rules(base, update, fragment):
    with pytest.raises(ValueError, match=fragment):
        DPLedger.model_validate(base.model_dump() | update)


def test_ledgers_written_before_secure_rng_still_load():
    """expert.json files published before the field existed carry ``secure_mode`` (Opacus' flag)."""
    legacy = DP.model_dump(exclude={"secure_rng", "noise_rng"})
    old = DPLedger.model_validate(legacy | {"secure_mode": False})
    assert old.secure_rng is False and old.noise_rng is None
    csprng = DPLedger.model_validate(legacy | {"secure_mode": True})
    assert csprng.secure_rng is True and csprng.noise_rng == "torchcsprng"
    plain = DPLedger.model_validate(NO_DP.model_dump(exclude={"secure_rng", "noise_rng"}) | {"secure_mode": False})
    assert plain == NO_DP
    with pytest.raises(ValueError, match="secure_mode"):
        DPLedger.model_validate(legacy | {"secure_mode": "yes"})


def test_public_view_says_whether_the_expert_is_dp():
    view = DP.public_view()
    assert view["dp"] is True and view["epsilon"] == 0.98 and view["delta"] == 1e-3
    assert {"accountant", "secure_rng", "noise_rng", "noise_multiplier", "sample_rate", "steps"} <= set(view)
    assert NO_DP.public_view()["dp"] is False and NO_DP.public_view()["epsilon"] is None


class _Boom:
    """Unpickling this runs code: a stand-in for a malicious tenant file."""

    marker = ""

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_pickle_files_are_never_loaded(saved, tmp_path):
    directory = saved[0]
    marker = tmp_path / "pwned.txt"
    boom = _Boom()
    boom.marker = str(marker)
    for name in ("pytorch_model.bin", "expert.pt", "expert.pkl"):
        (directory / name).write_bytes(pickle.dumps(boom))
    load_expert(directory)  # extra files are ignored ...
    assert not marker.exists()  # ... and never unpickled
    (directory / EXPERT_WEIGHTS).unlink()
    problems = _problems(directory)
    assert "pickle/torch.save formats are refused" in problems[0] and "expert.pkl" in problems[0]
    assert not marker.exists()


def test_missing_files_and_directory(tmp_path, saved):
    assert "not a directory" in _problems(tmp_path / "nope")[0]
    (saved[0] / EXPERT_JSON).unlink()
    assert f"{EXPERT_JSON}: not found" in _problems(saved[0])[0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / EXPERT_JSON).write_text("{not json")
    assert "not valid JSON" in _problems(tmp_path / "bad")[0]


def test_save_refuses_mismatched_or_nonfinite_models(toy, tmp_path):
    schema = load_schema(toy)
    arch = ExpertArch.from_schema(schema, hidden_sizes=(8, 4))
    spec = ExpertSpec.build(schema, arch, DP)
    with pytest.raises(ExpertError, match="does not match"):
        save_expert(build_expert(ExpertArch.from_schema(schema, hidden_sizes=(8,))), spec, tmp_path)
    model = build_expert(arch)
    with torch.no_grad():
        model.net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ExpertError, match=r"model\[fc1.weight\]: contains NaN"):
        save_expert(model, spec, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
