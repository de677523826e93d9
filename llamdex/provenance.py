"""Which code and which schema an artifact was trained with, so a stale one is retrained, not reused.

Connectors are only as good as the grammar, vocabulary and encoder that trained them, and an expert
carries its schema's vocabulary: a demo or a benchmark that reuses an artifact trained by older code
(or for an older schema) silently measures the old behaviour.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def source_fingerprint() -> str:
    """16 hex digits of SHA-256 over the llamdex package's source and data files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.glob("*.py")) + sorted(_PACKAGE.glob("*.json")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def stale_reason(metadata: dict, *, code: str | None = None, schema_sha256: str | None = None,
                 expert_version: int | None = None) -> str | None:
    """Why a published artifact (its registry ``metadata``) no longer matches what would train it now --
    the llamdex code, the schema, the expert it was fitted to -- or None when it is current. Checks only
    the arguments given; an artifact that does not record one of them is stale."""
    checks = (("llamdex_code", code, "trained by other llamdex code"),
              ("schema_sha256", schema_sha256, "trained for another version of the schema"),
              ("expert_version", expert_version, "fitted to another expert version"))
    for key, now, why in checks:
        if now is not None and metadata.get(key) != now:
            return why if key in metadata else f"no {key.replace('_', ' ')} recorded: published by older code"
    return None
