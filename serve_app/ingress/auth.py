"""Bearer-key authentication for the router (FastAPI dependencies).

Two HTTP bearer security schemes are declared in the OpenAPI spec, so clients (and the
isolation test, which builds its attack matrix from the spec) can tell which key a route needs:
``ApiKey`` (a tenant or an admin key) and ``AdminKey`` (admin keys only).
"""

from __future__ import annotations

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cluster.registry import NotFound, Principal
from serve_app.ingress.openai_api import OpenAIError
from serve_app.ingress.state import RouterState, get_state

API_KEY = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                     description="a tenant's API key (acts on that tenant) or an admin key (acts on any)")
ADMIN_KEY = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="an admin API key")


def _authenticate(creds: HTTPAuthorizationCredentials | None, state: RouterState) -> Principal:
    """The principal of a bearer key, or 401; then the key's rate limit (429)."""
    if creds is None or not creds.credentials.strip():
        raise OpenAIError(401, "missing API key; send 'Authorization: Bearer atl_…'",
                          type_="authentication_error", code="invalid_api_key")
    try:
        who = state.registry.authenticate(creds.credentials.strip())
    except NotFound as exc:
        raise OpenAIError(401, str(exc), type_="authentication_error", code="invalid_api_key") from None
    state.limiter.check(who.key_id)
    return who


def principal(creds: HTTPAuthorizationCredentials | None = Depends(API_KEY),
              state: RouterState = Depends(get_state)) -> Principal:
    """The caller's principal from ``Authorization: Bearer <key>``, or 401; then the rate limit (429)."""
    return _authenticate(creds, state)


def admin(creds: HTTPAuthorizationCredentials | None = Depends(ADMIN_KEY),
          state: RouterState = Depends(get_state)) -> Principal:
    """Like :func:`principal`, and 403 unless the key is an admin key."""
    who = _authenticate(creds, state)
    if not who.is_admin:
        raise OpenAIError(403, "this endpoint needs an admin key", type_="permission_error")
    return who


def check_tenant_access(who: Principal, tenant: str) -> None:
    """Tenant keys act only on their own tenant; admin keys on any."""
    if not who.is_admin and who.tenant != tenant:
        raise OpenAIError(403, f"this API key belongs to tenant {who.tenant!r}, not {tenant!r}",
                          type_="permission_error", param="tenant")
