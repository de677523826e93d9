"""Bearer-key authentication for the router (FastAPI dependencies)."""

from __future__ import annotations

from fastapi import Depends, Request

from cluster.registry import NotFound, Principal
from serve_app.openai_api import OpenAIError
from serve_app.state import RouterState, get_state


def principal(request: Request, state: RouterState = Depends(get_state)) -> Principal:
    """The caller's principal from ``Authorization: Bearer <key>``, or 401; then the rate limit (429)."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise OpenAIError(401, "missing API key; send 'Authorization: Bearer atl_…'",
                          type_="authentication_error", code="invalid_api_key")
    try:
        who = state.registry.authenticate(key.strip())
    except NotFound as exc:
        raise OpenAIError(401, str(exc), type_="authentication_error", code="invalid_api_key") from None
    state.limiter.check(who.key_id)
    return who


def admin(who: Principal = Depends(principal)) -> Principal:
    if not who.is_admin:
        raise OpenAIError(403, "this endpoint needs an admin key", type_="permission_error")
    return who


def check_tenant_access(who: Principal, tenant: str) -> None:
    """Tenant keys act only on their own tenant; admin keys on any."""
    if not who.is_admin and who.tenant != tenant:
        raise OpenAIError(403, f"this API key belongs to tenant {who.tenant!r}, not {tenant!r}",
                          type_="permission_error", param="tenant")
