"""Deep validation of tenant artifacts, delegated to the science packages that define them.

Imported for its side effect by :mod:`cluster.registry`: after this, publishing a schema
runs the full schema rules, so a bad artifact is refused before any byte is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.artifacts import ArtifactError, ArtifactKind, register_validator


def _validate_schema(files: Mapping[str, bytes]) -> None:
    from llamdex.schema import SchemaError, load_schema

    try:
        load_schema(files["schema.json"].decode("utf-8"))
    except SchemaError as exc:
        raise ArtifactError(f"schema.json: {exc}") from None


register_validator(ArtifactKind.schema, _validate_schema)
