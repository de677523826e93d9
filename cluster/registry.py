"""The artifact registry: tenants, hashed API keys and versioned, immutable artifacts.

Layout under the store root (see :mod:`cluster.storage`)::

    tenants/<tenant>/tenant.json                      one file per tenant
    keys/<sha256 of key>.json                         one file per key; the key itself is never stored
    artifacts/<tenant>/<kind>/<name>/blobs/<id>/...   data files, written first
    artifacts/<tenant>/<kind>/<name>/versions/<n>.json  manifest, written last (the commit point)

A version exists once its manifest exists. Manifests are created with "create only if
absent", so concurrent publishers each get their own version number and a publisher killed
mid-write leaves only an orphaned blob directory that no manifest points to: the previous
version stays the latest and intact. There is no shared mutable index to corrupt.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cluster import lease
from cluster.artifacts import ArtifactError, ArtifactKind, check_name, parse_kind, validate_files
from cluster.storage import Storage

TENANT_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,38}$")
SYSTEM_TENANT = "system"
"""Reserved namespace for artifacts that belong to the service (adapter banks)."""
KEY_PREFIX = "atl_"
MAX_VERSION_RETRIES = 1000


class RegistryError(ValueError):
    """A registry request was refused; the message names the field and the fix."""


class NotFound(RegistryError, LookupError):
    """The tenant, key or artifact does not exist."""


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    display_name: str = ""
    description: str = ""
    created_at: float


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key_id: str
    tenant: str | None
    scope: Literal["tenant", "admin"]
    created_at: float
    label: str = ""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    size: int


class Manifest(BaseModel):
    """What a version is: its files (with checksums), where they live, and free metadata."""

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    tenant: str
    kind: ArtifactKind
    name: str
    version: int
    blob: str
    files: dict[str, FileEntry]
    metadata: dict = {}
    created_at: float

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.tenant, self.kind, self.name, self.version)


@dataclass(frozen=True, order=True)
class ArtifactRef:
    tenant: str
    kind: ArtifactKind
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.tenant}/{self.kind.value}/{self.name}@{self.version}"


@dataclass(frozen=True)
class Principal:
    """Who an API key belongs to."""

    tenant: str | None
    scope: Literal["tenant", "admin"]
    key_id: str

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def check_tenant_id(tenant: str) -> str:
    """Tenant ids are short lowercase slugs; ``system`` is reserved for the service."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise RegistryError(f"tenant: {tenant!r} is not a valid tenant id; "
                            f"fix: match {TENANT_PATTERN.pattern} (lowercase letter first, 2–39 chars)")
    return tenant


def hash_key(key: str) -> str:
    """SHA-256 of an API key. Keys carry 256 random bits, so a fast hash is sufficient."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Registry:
    """Tenants, keys and artifacts on one store. Safe to use from many processes at once."""

    def __init__(self, store: Storage | str):
        self.store = store if isinstance(store, Storage) else Storage.from_uri(store)

    # ---------------------------------------------------------------- tenants and keys
    def create_tenant(self, tenant: str, display_name: str = "", description: str = "") -> tuple[Tenant, str]:
        """Create a tenant and its first API key. The key is returned once and stored only hashed."""
        check_tenant_id(tenant)
        if tenant == SYSTEM_TENANT:
            raise RegistryError(f"tenant: {tenant!r} is reserved; fix: choose another id")
        record = Tenant(id=tenant, display_name=display_name, description=description, created_at=time.time())
        if not self.store.create_exclusive(f"tenants/{tenant}/tenant.json", _dump(record)):
            raise RegistryError(f"tenant: {tenant!r} already exists; fix: choose another id or issue a new key")
        return record, self.issue_key(tenant)

    def get_tenant(self, tenant: str) -> Tenant:
        check_tenant_id(tenant)
        try:
            return Tenant.model_validate_json(self.store.read_bytes(f"tenants/{tenant}/tenant.json"))
        except FileNotFoundError:
            raise NotFound(f"tenant: {tenant!r} does not exist; fix: create it first") from None

    def list_tenants(self) -> list[Tenant]:
        return [self.get_tenant(t) for t in self.store.list_dir("tenants") if TENANT_PATTERN.match(t)]

    def issue_key(self, tenant: str | None, scope: Literal["tenant", "admin"] = "tenant", label: str = "") -> str:
        """Mint a new key for ``tenant`` (or an admin key with ``tenant=None, scope='admin'``)."""
        if scope == "tenant":
            if tenant is None:
                raise RegistryError("tenant: a tenant-scoped key needs a tenant")
            self.get_tenant(tenant)
        elif tenant is not None:
            raise RegistryError("tenant: admin keys are not bound to a tenant; fix: pass tenant=None")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        record = KeyRecord(key_id=digest[:12], tenant=tenant, scope=scope, created_at=time.time(), label=label)
        self.store.write_bytes(f"keys/{digest}.json", _dump(record))
        return key

    def authenticate(self, key: str) -> Principal:
        """Resolve a presented key to its principal, or raise NotFound (→ HTTP 401)."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            raise NotFound("authorization: not an Atelier API key; fix: send 'Authorization: Bearer atl_…'")
        try:
            record = KeyRecord.model_validate_json(self.store.read_bytes(f"keys/{hash_key(key)}.json"))
        except FileNotFoundError:
            raise NotFound("authorization: unknown or revoked API key") from None
        return Principal(tenant=record.tenant, scope=record.scope, key_id=record.key_id)

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        records = []
        for fname in self.store.list_dir("keys"):
            if fname.endswith(".json"):
                rec = KeyRecord.model_validate_json(self.store.read_bytes(f"keys/{fname}"))
                if tenant is None or rec.tenant == tenant:
                    records.append(rec)
        return records

    def revoke_key(self, key_id: str) -> None:
        """Delete the key whose public id (first 12 hex chars of its hash) is ``key_id``."""
        for fname in self.store.list_dir("keys"):
            if fname.startswith(key_id) and len(key_id) >= 8:
                self.store.delete_file(f"keys/{fname}")
                return
        raise NotFound(f"key_id: no key {key_id!r}; fix: see `atelier keys list`")

    # ---------------------------------------------------------------- locks
    @contextmanager
    def lock(self, name: str, stale_after_s: float = 120.0, wait_s: float = 60.0) -> Iterator[None]:
        """A cross-process lease on ``locks/<name>/`` for read-modify-publish sequences (bank updates).

        A crashed holder's lease is taken over atomically after ``stale_after_s``
        (:mod:`cluster.lease`); raises RegistryError naming the holder after ``wait_s`` without it.
        """
        try:
            with lease.hold(self.store, name, stale_after_s=stale_after_s, wait_s=wait_s):
                yield
        except lease.LeaseTimeout as exc:
            raise RegistryError(str(exc)) from None

    # ---------------------------------------------------------------- artifacts
    def publish(self, tenant: str, kind: ArtifactKind | str, name: str, files: Mapping[str, bytes],
                metadata: Mapping | None = None,
                on_progress: Callable[[str], None] | None = None) -> ArtifactRef:
        """Validate, then store ``files`` as the next version of ``tenant/kind/name``.

        Data files go to a fresh blob directory first; the manifest is created last and only if
        its version number is still free, so readers never see a partial version.
        """
        kind = parse_kind(kind) if isinstance(kind, str) else kind
        check_name(name)
        if tenant != SYSTEM_TENANT:
            self.get_tenant(tenant)
        validate_files(kind, files)
        metadata = dict(metadata or {})
        json.dumps(metadata)  # metadata must be JSON; fail before writing anything
        base = _artifact_dir(tenant, kind, name)
        blob = uuid.uuid4().hex
        entries = {}
        for fname, data in files.items():
            self.store.write_bytes(f"{base}/blobs/{blob}/{fname}", data)
            entries[fname] = FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
            if on_progress:
                on_progress(f"wrote {fname}")
        if on_progress:
            on_progress("data written")
        version = self._latest_version(tenant, kind, name) or 0
        for _ in range(MAX_VERSION_RETRIES):
            version += 1
            manifest = Manifest(tenant=tenant, kind=kind, name=name, version=version, blob=blob,
                                files=entries, metadata=metadata, created_at=time.time())
            if self.store.create_exclusive(f"{base}/versions/{version:06d}.json", _dump(manifest)):
                if on_progress:
                    on_progress(f"published {manifest.ref}")
                return manifest.ref
        raise RegistryError(f"could not allocate a version for {tenant}/{kind.value}/{name}")

    def versions(self, tenant: str, kind: ArtifactKind | str, name: str) -> list[int]:
        """All committed versions, ascending."""
        kind = parse_kind(kind) if isinstance(kind, str) else kind
        names = self.store.list_dir(f"{_artifact_dir(tenant, kind, name)}/versions")
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _latest_version(self, tenant: str, kind: ArtifactKind, name: str) -> int | None:
        found = self.versions(tenant, kind, name)
        return found[-1] if found else None

    def resolve(self, tenant: str, kind: ArtifactKind | str, name: str, version: int | None = None) -> Manifest:
        """The manifest of ``version`` (default: latest) or NotFound naming what is missing."""
        kind = parse_kind(kind) if isinstance(kind, str) else kind
        if version is None:
            version = self._latest_version(tenant, kind, name)
            if version is None:
                raise NotFound(f"model: no {kind.value} named {name!r} for tenant {tenant!r}")
        try:
            raw = self.store.read_bytes(f"{_artifact_dir(tenant, kind, name)}/versions/{version:06d}.json")
        except FileNotFoundError:
            raise NotFound(f"version: {tenant}/{kind.value}/{name} has no version {version}") from None
        return Manifest.model_validate_json(raw)

    def list_artifacts(self, tenant: str, kind: ArtifactKind | str | None = None) -> list[Manifest]:
        """Latest manifest of every artifact of ``tenant`` (optionally of one kind)."""
        kinds = [parse_kind(kind) if isinstance(kind, str) else kind] if kind else list(ArtifactKind)
        out = []
        for k in kinds:
            for name in self.store.list_dir(f"artifacts/{tenant}/{k.value}"):
                if self._latest_version(tenant, k, name) is not None:
                    out.append(self.resolve(tenant, k, name))
        return out

    def read_file(self, manifest: Manifest, fname: str, verify: bool = True) -> bytes:
        """One file of a version, checked against the manifest's SHA-256."""
        if fname not in manifest.files:
            raise NotFound(f"file: {manifest.ref} has no file {fname!r}")
        data = self.store.read_bytes(f"{_artifact_dir(manifest.tenant, manifest.kind, manifest.name)}"
                                     f"/blobs/{manifest.blob}/{fname}")
        if verify and hashlib.sha256(data).hexdigest() != manifest.files[fname].sha256:
            raise ArtifactError(f"{manifest.ref}: {fname} does not match its checksum (store corrupted)")
        return data

    def read_all(self, manifest: Manifest) -> dict[str, bytes]:
        return {fname: self.read_file(manifest, fname) for fname in manifest.files}

    def materialize(self, manifest: Manifest, cache_dir: Path) -> Path:
        """A local directory holding the version's files (the blob itself on a local store)."""
        rel = f"{_artifact_dir(manifest.tenant, manifest.kind, manifest.name)}/blobs/{manifest.blob}"
        local = self.store.local_path(rel)
        if local is not None:
            return local
        target = cache_dir / manifest.tenant / manifest.kind.value / manifest.name / str(manifest.version)
        if (target / ".complete").exists():
            return target
        target.mkdir(parents=True, exist_ok=True)
        for fname, data in self.read_all(manifest).items():
            (target / fname).write_bytes(data)
        (target / ".complete").write_text(manifest.blob)
        return target

    def orphan_blobs(self, tenant: str, kind: ArtifactKind | str, name: str) -> list[str]:
        """Blob directories no manifest points to: left by crashed publishers, or still being
        written by one in flight, so only delete those older than any running publish."""
        kind = parse_kind(kind) if isinstance(kind, str) else kind
        used = {self.resolve(tenant, kind, name, v).blob for v in self.versions(tenant, kind, name)}
        return [b for b in self.store.list_dir(f"{_artifact_dir(tenant, kind, name)}/blobs") if b not in used]


def _artifact_dir(tenant: str, kind: ArtifactKind, name: str) -> str:
    return f"artifacts/{tenant}/{kind.value}/{name}"


def _dump(model: BaseModel) -> bytes:
    return model.model_dump_json(indent=2).encode("utf-8")
