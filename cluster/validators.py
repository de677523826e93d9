"""Deep validation of tenant artifacts, delegated to the science packages that define them.

Nothing happens at import. Each process that publishes tenant artifacts calls
:func:`install_validators` where it starts (the ``atelier`` CLI, the Serve router and replicas,
every ``train_jobs`` job and its Ray Train workers, the test session); from then on publishing a
schema, expert, adapter or connectors runs the science package's full rules, so a bad artifact is refused
before any byte is stored. Without it the registry still runs the format checks of
:mod:`cluster.artifacts` (file names, JSON, safe tensors).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cluster.artifacts import (
    NAME_PATTERN,
    REQUIRED_FILES,
    ArtifactError,
    ArtifactKind,
    parse_json_object,
    register_validator,
)


@contextmanager
def _uploaded(files: Mapping[str, bytes], kind: ArtifactKind) -> Iterator[str]:
    """The upload's required files of ``kind`` written into a temporary directory, for the science
    packages' loaders (which read directories); removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        for fname in REQUIRED_FILES[kind]:
            (Path(tmp) / fname).write_bytes(files[fname])
        yield tmp


def _validate_schema(files: Mapping[str, bytes]) -> None:
    from llamdex.schema import SchemaError, load_schema

    try:
        load_schema(files["schema.json"].decode("utf-8"))
    except SchemaError as exc:
        raise ArtifactError(f"schema.json: {exc}") from None



def _validate_expert(files: Mapping[str, bytes]) -> None:
    """Expert files must be self-consistent: spec valid, weights hash, tensor names/shapes, finite."""
    from llamdex.expert import ExpertError, load_expert

    with _uploaded(files, ArtifactKind.expert) as tmp:
        try:
            load_expert(tmp)
        except ExpertError as exc:
            raise ArtifactError(f"expert: {exc}") from None


def _validate_connectors(files: Mapping[str, bytes]) -> None:
    """Connectors must load: spec valid, weights' SHA-256 as recorded, every tensor present, shaped
    as the spec says and finite. The base model is checked where they are served (the pool refuses
    connectors built for another model's hash)."""
    from llamdex.connectors_io import ConnectorsError, load_connectors, read_spec

    with _uploaded(files, ArtifactKind.connectors) as tmp:
        try:
            load_connectors(tmp, read_spec(tmp).base_model_hash)
        except ConnectorsError as exc:
            raise ArtifactError(f"connectors: {str(exc).replace(tmp, '<upload>')}") from None


def check_expert_for_tenant(registry, tenant: str, files: Mapping[str, bytes]) -> str:
    """An expert must match a schema the tenant published (``schema_name`` in expert.json).

    Returns the schema name. Called before publishing by the upload API and the experts job.
    """
    from cluster.registry import NotFound
    from llamdex.expert import ExpertError, load_expert

    spec = parse_json_object("expert.json", files["expert.json"])
    schema_name = spec.get("schema_name", "")
    if not isinstance(schema_name, str) or not NAME_PATTERN.match(schema_name):
        raise ArtifactError(f"expert.json: schema_name {schema_name!r} is not a schema name; "
                            f"fix: the name the schema was published under ({NAME_PATTERN.pattern})")
    try:
        manifest = registry.resolve(tenant, "schema", schema_name)
    except NotFound:
        raise ArtifactError(f"expert.json: schema_name {schema_name!r} is not a schema of tenant {tenant!r}; "
                            "fix: publish the schema first (POST /v1/tenants/<tenant>/schemas/<name>)") from None
    schema = registry.read_file(manifest, "schema.json").decode("utf-8")
    with _uploaded(files, ArtifactKind.expert) as tmp:
        try:
            load_expert(tmp, schema=schema)
        except ExpertError as exc:
            raise ArtifactError(f"expert does not fit schema {schema_name!r}: {exc}") from None
    return schema_name



def _load_adapter(files: Mapping[str, bytes], base_model_path=None):
    """The uploaded PEFT files as a ``compression.LoraAdapter`` (format checked; shapes checked
    against the model at ``base_model_path`` if given); ArtifactError naming the field otherwise."""
    from compression import AdapterFormatError, load_peft_adapter

    shapes = None
    if base_model_path is not None:
        from cluster.banks import model_linear_shapes

        shapes = model_linear_shapes(str(base_model_path))
    with _uploaded(files, ArtifactKind.adapter) as tmp:
        try:
            return load_peft_adapter(tmp, name="upload", base_shapes=shapes)
        except AdapterFormatError as exc:
            raise ArtifactError(f"adapter: {str(exc).replace(tmp, '<upload>')}") from None


def _validate_adapter(files: Mapping[str, bytes]) -> None:
    """A PEFT LoRA: plain ΔW = B·A pairs, ranks matching the config, float and finite."""
    _load_adapter(files)


def check_adapter_fits(files: Mapping[str, bytes], base_model_path) -> None:
    """ArtifactError unless the adapter's modules and shapes exist in the base model at ``base_model_path``."""
    _load_adapter(files, base_model_path)


def install_validators() -> None:
    """Make the registry of this process deep-check schemas, experts and adapters (idempotent)."""
    register_validator(ArtifactKind.schema, _validate_schema)
    register_validator(ArtifactKind.expert, _validate_expert)
    register_validator(ArtifactKind.adapter, _validate_adapter)
    register_validator(ArtifactKind.connectors, _validate_connectors)
