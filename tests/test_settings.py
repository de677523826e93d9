from pathlib import Path

import pytest

from cluster.settings import describe_settings, load_settings


def test_env_overrides_and_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_HOME", str(tmp_path))
    monkeypatch.setenv("ATELIER_SERVE_PORT", "8123")
    monkeypatch.delenv("ATELIER_STORE", raising=False)
    s = load_settings()
    assert s.home == tmp_path and s.serve_port == 8123
    assert s.store_uri == str(tmp_path / "store")
    assert load_settings(serve_port=9000).serve_port == 9000
    assert isinstance(load_settings(home="~/x").home, Path)


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("ATELIER_RAY_PORT", "abc")
    with pytest.raises(ValueError, match="ATELIER_RAY_PORT must be an integer"):
        load_settings()
    monkeypatch.delenv("ATELIER_RAY_PORT")
    monkeypatch.setenv("ATELIER_AUTH", "maybe")
    with pytest.raises(ValueError, match="ATELIER_AUTH"):
        load_settings()


def test_every_setting_is_documented():
    rows = describe_settings(load_settings())
    assert all(doc for _, _, doc in rows), [env for env, _, doc in rows if not doc]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [env for env, _, _ in rows if env not in readme]
    assert not missing, f"settings not in README: {missing}"


def test_every_atelier_variable_the_code_reads_is_listed():
    """``cluster/settings.py`` is the complete list: Settings fields plus OTHER_ENV, nothing else."""
    import dataclasses
    import re

    from cluster.settings import OTHER_ENV, Settings

    root = Path(__file__).resolve().parent.parent
    known = {f"ATELIER_{f.name.upper()}" for f in dataclasses.fields(Settings)} | set(OTHER_ENV) | {"ATELIER_FOO"}
    named = {m for package in ("cli", "cluster", "serve_app", "train_jobs", "compression", "llamdex", "causal_lm")
             for path in (root / package).rglob("*.py") for m in re.findall(r"ATELIER_[A-Z_]+", path.read_text())}
    assert named - known == set()
