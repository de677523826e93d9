"""An artifact records the code and schema that trained it; a stale one is named as such, never reused."""

from __future__ import annotations

from llamdex import provenance
from llamdex.provenance import source_fingerprint, stale_reason


def test_the_fingerprint_follows_the_llamdex_source(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "_PACKAGE", tmp_path)
    before = source_fingerprint()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_fingerprint() != before and len(before) == 16


def test_stale_reason_names_what_changed_and_accepts_a_current_artifact():
    meta = {"llamdex_code": "c1", "schema_sha256": "s1", "expert_version": 3}
    assert stale_reason(meta, code="c1", schema_sha256="s1", expert_version=3) is None
    assert stale_reason(meta, code="c2") == "trained by other llamdex code"
    assert stale_reason(meta, schema_sha256="s2") == "trained for another version of the schema"
    assert stale_reason(meta, code="c1", expert_version=4) == "fitted to another expert version"
    assert "no llamdex code recorded: published by older code" == stale_reason({"expert_version": 3}, code="c1", expert_version=3)
