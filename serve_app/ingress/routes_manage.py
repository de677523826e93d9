"""Management API: tenants and keys (admin), artifact uploads and listings (tenant or admin).

Uploads take either ``multipart/form-data`` (one part per file, plus optional ``description``,
``metadata`` and, for adapters, ``examples`` fields: example user prompts that ``model="auto"``
routes by) or JSON ``{"files": {"<name>": "<base64>"}, "metadata": {...}}``; a
schema may also be sent as its plain JSON document. Everything is validated before anything is
stored; the response names the new version. An uploaded adapter joins every pool's bank at once
(a new bank version, picked up by replicas within seconds): compressed (projected onto the bank's
shared bases) when that keeps its reconstruction error within the pool's budget, else exact; the
response says which, the error and the budget, and whether a refit of the bank was queued.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.artifacts import ArtifactError, ArtifactKind, check_name, validate_files
from cluster.banks import RefitPolicy, add_to_bank
from cluster.ledger import expert_ledger
from cluster.logs import get_logger
from cluster.models import resolve_model
from cluster.registry import SYSTEM_TENANT, Principal, RegistryError
from cluster.validators import check_adapter_fits, check_expert_for_tenant
from serve_app.ingress.auth import admin, check_tenant_access, principal
from serve_app.ingress.openai_api import OpenAIError, bad_request
from serve_app.ingress.routing import check_examples
from serve_app.ingress.state import RouterState, get_state
from serve_app.wire import BankStatus

api = APIRouter()
log = get_logger("manage")
BANK_SWAP_WAIT_S = 120.0
"""How long an upload waits for every replica of a pool to serve the new bank before answering."""

UPLOAD_KINDS = {"schemas": ArtifactKind.schema, "experts": ArtifactKind.expert, "adapters": ArtifactKind.adapter,
                "connectors": ArtifactKind.connectors}


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    display_name: str = ""
    description: str = ""


@api.post("/v1/admin/tenants", status_code=201)
async def create_tenant(body: NewTenant, _: Principal = Depends(admin), state: RouterState = Depends(get_state)):
    """Create a tenant; the response holds its first API key, shown only here."""
    try:
        tenant, key = await asyncio.to_thread(state.registry.create_tenant, body.id, body.display_name,
                                              body.description)
    except RegistryError as exc:
        status = 409 if "already exists" in str(exc) else 400
        raise OpenAIError(status, str(exc), param="id") from None
    return {"tenant": tenant.model_dump(), "api_key": key}


@api.get("/v1/admin/tenants")
async def list_tenants(_: Principal = Depends(admin), state: RouterState = Depends(get_state)):
    return {"data": [t.model_dump() for t in await asyncio.to_thread(state.registry.list_tenants)]}


@api.post("/v1/admin/tenants/{tenant}/keys", status_code=201)
async def issue_key(tenant: str, _: Principal = Depends(admin), state: RouterState = Depends(get_state)):
    await _known_tenant(state, tenant)
    key = await asyncio.to_thread(state.registry.issue_key, tenant)
    return {"tenant": tenant, "api_key": key}


@api.get("/v1/tenants/{tenant}/artifacts")
async def list_artifacts(tenant: str, who: Principal = Depends(principal), state: RouterState = Depends(get_state)):
    check_tenant_access(who, tenant)
    if tenant != SYSTEM_TENANT:  # admins may list the service's own artifacts (banks)
        await _known_tenant(state, tenant)
    return {"data": await asyncio.to_thread(_listing, state.registry, tenant)}


def _listing(registry, tenant: str) -> list[dict]:
    """Latest version of each artifact; experts also show their DP ledger (``privacy``)."""
    rows = []
    for m in registry.list_artifacts(tenant):
        row = {"ref": str(m.ref), "kind": m.kind.value, "name": m.name, "version": m.version,
               "files": {k: v.size for k, v in m.files.items()}, "metadata": m.metadata}
        if m.kind == ArtifactKind.expert:
            row["privacy"] = expert_ledger(registry, m)
        rows.append(row)
    return rows


UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "one part per artifact file, named by its file name"},
        "description": {"type": "string"},
        "metadata": {"type": "string", "description": "a JSON object"}}}},
    "application/json": {"schema": {"type": "object", "description": "a schema document, or {files, metadata}",
                                    "properties": {
                                        "files": {"type": "object", "additionalProperties": {
                                            "type": "string", "format": "byte"}},
                                        "description": {"type": "string"},
                                        "metadata": {"type": "object"}}}}}}


@api.post("/v1/tenants/{tenant}/{kind}/{name}", status_code=201, openapi_extra={"requestBody": UPLOAD_BODY})
async def upload(tenant: str, kind: str, name: str, request: Request, who: Principal = Depends(principal),
                 state: RouterState = Depends(get_state)):
    """Validate and publish an artifact; adapters are also added to the pools' banks."""
    check_tenant_access(who, tenant)
    if kind not in UPLOAD_KINDS:
        raise OpenAIError(404, f"unknown upload kind {kind!r}; use one of {sorted(UPLOAD_KINDS)}", param="kind")
    if kind == "connectors" and not who.is_admin:
        raise OpenAIError(403, "connectors are produced by Atelier's connectors job; tenants upload "
                               "schemas, experts and adapters", type_="permission_error")
    art_kind = UPLOAD_KINDS[kind]
    try:
        check_name(name)
    except ArtifactError as exc:
        raise bad_request(str(exc), "name") from None
    await _known_tenant(state, tenant)
    files, metadata = await _read_upload(request, art_kind, state.config.max_upload_mb)
    if "examples" in metadata:
        if art_kind != ArtifactKind.adapter:
            raise bad_request("examples: example prompts describe adapters (experts are described by their "
                              "schema); leave the field out", "examples")
        try:
            metadata["examples"] = check_examples(metadata["examples"])
        except ValueError as exc:
            raise OpenAIError(422, str(exc), param="examples") from None
    other = ArtifactKind.expert if art_kind == ArtifactKind.adapter else ArtifactKind.adapter
    if art_kind in (ArtifactKind.adapter, ArtifactKind.expert) and await asyncio.to_thread(
            state.registry.versions, tenant, other, name):
        raise OpenAIError(409, f"{tenant}/{name} is already an {other.value}; model names are shared by adapters "
                               "and experts, choose another name", param="name")
    try:
        if art_kind == ArtifactKind.expert and "expert.json" in files and "expert.safetensors" in files:
            await asyncio.to_thread(check_expert_for_tenant, state.registry, tenant, files)
        if art_kind == ArtifactKind.adapter:  # refuse what no pool could serve before storing anything
            await asyncio.to_thread(_check_adapter_fits, state, files)
        ref = await asyncio.to_thread(state.registry.publish, tenant, art_kind, name, files, metadata)
    except (ArtifactError, RegistryError, ValueError) as exc:
        raise OpenAIError(422, str(exc), param="files") from None
    result = {"ref": str(ref), "tenant": tenant, "kind": art_kind.value, "name": name, "version": ref.version}
    if art_kind == ArtifactKind.adapter:
        result["banks"] = await _add_to_banks(state, tenant, name)
    state.catalog.invalidate()
    log.info("manage.uploaded", ref=str(ref), by=who.key_id)
    return result


async def _known_tenant(state: RouterState, tenant: str) -> None:
    """404 naming ``tenant`` unless it exists (admin keys may name any tenant, even a made-up one)."""
    try:
        await asyncio.to_thread(state.registry.get_tenant, tenant)
    except RegistryError as exc:  # NotFound, or not a tenant id at all
        raise OpenAIError(404, str(exc), type_="not_found_error", param="tenant") from None


def _check_adapter_fits(state: RouterState, files: dict[str, bytes]) -> None:
    """ArtifactError unless the adapter's format is valid and its shapes fit at least one pool's model."""
    validate_files(ArtifactKind.adapter, files)
    errors = {}
    for pool in state.config.pools:
        try:
            check_adapter_fits(files, resolve_model(pool.model).path)
            return
        except ArtifactError as exc:
            errors[pool.name] = str(exc)
    raise ArtifactError(f"adapter fits no pool's base model: {errors}")


async def _add_to_banks(state: RouterState, tenant: str, name: str) -> list[dict]:
    out = []
    for pool in state.config.pools:
        model = await asyncio.to_thread(resolve_model, pool.model)
        policy = RefitPolicy(pool.bank_refit_share, pool.bank_refit_min_adapters)
        max_rank = pool.vllm.max_lora_rank if pool.engine == "vllm" else None
        try:
            update = await asyncio.to_thread(add_to_bank, state.registry, pool.bank_name, model, tenant, name,
                                             pool.bank_error_budget, policy, max_rank)
        except (ArtifactError, ValueError) as exc:  # shapes do not fit this pool's base model, rank too high
            out.append({"pool": pool.name, "added": False, "error": str(exc)})
            continue
        out.append({"pool": pool.name, "added": True, "bank_version": update.version,
                    "bank_adapters": update.adapters, "served": update.served,
                    "recon_error": round(update.mean_error, 6), "recon_error_mean": round(update.mean_error, 6),
                    "projection_error": None if update.projection_error is None else round(update.projection_error, 6),
                    "error_budget": update.budget, "bank_exact_adapters": update.exact_adapters,
                    "bank_exact_share": round(update.exact_share, 4),
                    "refit": await _queue_refit(state, pool) if update.refit_due else "not due"})
        out[-1].update(await _swap_replicas(state, pool.name, update.version))
    if not any(o["added"] for o in out):
        raise OpenAIError(422, f"adapter fits no pool's base model: {out}", param="files")
    return out


async def _swap_replicas(state: RouterState, pool_name: str, version: int) -> dict:
    """Make every running replica of the pool load bank ``version`` now, and wait until each has, so
    a 201 means "served as uploaded"; ``replicas_serving`` < ``replicas`` says some did not (they
    keep polling the registry and take it within ``bank_poll_s``)."""
    try:
        statuses = await state.pools[pool_name].broadcast("reload_bank", version).results_async(
            timeout_s=BANK_SWAP_WAIT_S, return_exceptions=True)
    except Exception as exc:  # no replica yet, or the wait ran out
        log.warning("manage.bank_swap_unconfirmed", pool=pool_name, version=version, error=repr(exc))
        return {"replicas": None, "replicas_serving": None, "replica_errors": [repr(exc)]}
    serving = [s for s in statuses if isinstance(s, BankStatus) and s.error is None
               and s.bank_version is not None and s.bank_version >= version]
    errors = [repr(s) if isinstance(s, BaseException) else getattr(s, "error", repr(s))
              for s in statuses if s not in serving]
    if errors:
        log.warning("manage.bank_swap_failed", pool=pool_name, version=version, errors=errors)
    return {"replicas": len(statuses), "replicas_serving": len(serving), **({"replica_errors": errors} if errors else {})}


async def _queue_refit(state: RouterState, pool) -> str:
    """Queue the Tune bank sweep on this pool's bank (cluster.bank_refit); "started", "queued" or why not."""
    from cluster.bank_refit import RefitRequest, queue_refit

    request = RefitRequest(store=state.registry.store.uri, bank=pool.bank_name, model=pool.model,
                           budget=pool.bank_error_budget, ranks=tuple(pool.bank_refit_ranks),
                           clusters=tuple(pool.bank_refit_clusters), methods=tuple(pool.bank_refit_methods),
                           max_rank=pool.vllm.max_lora_rank if pool.engine == "vllm" else None)
    try:
        return await asyncio.to_thread(queue_refit, request)
    except Exception as exc:  # the upload itself succeeded; say why no refit was queued
        log.error("manage.refit_not_queued", pool=pool.name, error=repr(exc))
        return f"not queued: {exc!r}"


async def _read_upload(request: Request, kind: ArtifactKind, max_mb: float) -> tuple[dict[str, bytes], dict]:
    limit = int(max_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"upload of {int(declared)} bytes exceeds the {max_mb:g} MB limit", param="files")
    chunks, size = [], 0
    async for chunk in request.stream():  # stop reading at the limit (a chunked body declares no length)
        size += len(chunk)
        if size > limit:
            raise OpenAIError(413, f"upload of more than {limit} bytes exceeds the {max_mb:g} MB limit",
                              param="files")
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_part_size=limit)
        except StarletteHTTPException as exc:
            raise bad_request(f"body: malformed multipart/form-data ({exc.detail}); fix: send one part per file",
                              "body") from None
        files, metadata = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                fname = value.filename or key
                if fname in files:
                    raise bad_request(f"files: {fname!r} sent twice; send each file once", "files")
                files[fname] = await value.read()
            elif key == "metadata":
                metadata.update(_json_object(value, "metadata"))
            elif key == "description":
                metadata["description"] = str(value)
            elif key == "examples":  # repeated field, one prompt each, or one JSON list
                value = str(value)
                new = _json_list(value, "examples") if value.lstrip().startswith("[") else [value]
                metadata["examples"] = [*metadata.get("examples", []), *new]
            else:
                raise bad_request(f"unexpected form field {key!r}; send files, 'description', 'examples' or "
                                  "'metadata'", key)
        return files, metadata
    if ctype.startswith("application/json"):
        doc = _json_object(body, "body")
        if "files" not in doc:
            if kind == ArtifactKind.schema:
                return {"schema.json": body}, {}
            raise bad_request("JSON uploads need {'files': {name: base64}, 'metadata': {...}}", "files")
        if not isinstance(doc["files"], dict):
            raise bad_request("files must be an object of file name -> base64 string", "files")
        files = {}
        for fname, b64 in doc["files"].items():
            try:
                files[fname] = base64.b64decode(b64, validate=True)
            except (binascii.Error, TypeError):
                raise bad_request(f"files.{fname} is not valid base64", f"files.{fname}") from None
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise bad_request("metadata must be a JSON object", "metadata")
        if "description" in doc:
            metadata["description"] = str(doc["description"])
        if "examples" in doc:
            metadata["examples"] = doc["examples"]
        return files, metadata
    raise OpenAIError(415, f"content-type {ctype or 'missing'} not supported; use multipart/form-data or "
                           "application/json", param="content-type")


def _json_list(raw: str, field: str) -> list:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise bad_request(f"{field} is not a valid JSON list", field) from None
    if not isinstance(value, list):
        raise bad_request(f"{field} must be a JSON list of strings", field)
    return value


def _json_object(raw: bytes | str, field: str) -> dict:
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise bad_request(f"{field} is not valid JSON (or nested too deeply)", field) from None
    if not isinstance(value, dict):
        raise bad_request(f"{field} must be a JSON object", field)
    return value
