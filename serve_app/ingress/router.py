"""The FastAPI ingress: builds the HTTP app, maps every error to OpenAI's error shape, and
hosts the per-replica :class:`RouterState` (registry, catalog, pool handles, rate limiter)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.logs import get_logger
from cluster.registry import Registry
from cluster.validators import install_validators
from serve_app.config import AppConfig
from serve_app.ingress import routes_experts, routes_manage, routes_openai
from serve_app.ingress.body_limit import JsonBodyLimit
from serve_app.ingress.catalog import Catalog
from serve_app.ingress.openai_api import OpenAIError
from serve_app.ingress.state import RateLimiter, RouterState, TenantGate, set_state
from serve_app.metrics import RouterMetrics

log = get_logger("router")


def create_api() -> FastAPI:
    """The HTTP surface (OpenAPI docs at /docs); state is attached by the Router deployment."""
    api = FastAPI(title="Atelier", version="0.1.0",
                  description="OpenAI-compatible serving of per-tenant LLM customizations")
    api.add_middleware(JsonBodyLimit)
    api.include_router(routes_openai.api)
    api.include_router(routes_experts.api)
    api.include_router(routes_manage.api)

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # loc is ("body", <byte offset>)
            at = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
            message = (f"body: invalid JSON{'' if at is None else f' at byte {at}'} ({first.get('msg')}); "
                       "fix: send one JSON object")
            return JSONResponse(OpenAIError(422, message, param="body").body(), status_code=422)
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                            for e in exc.errors()[:5])
        return JSONResponse(OpenAIError(422, message or "invalid request", param=param).body(), status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        detail, param = str(exc.detail), None
        if exc.status_code == 413 or (exc.status_code == 400 and "parsing the body" in detail):
            param = "body"  # e.g. a body nested too deep to parse, or over the JSON size limit
            if exc.status_code == 400:
                detail = "body: could not be parsed as JSON (too deeply nested or malformed); fix: send one flat JSON object"
        return JSONResponse(OpenAIError(exc.status_code, detail, type_=type_, param=param).body(),
                            status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("router.unhandled", error=repr(exc), exc_info=True)
        return JSONResponse(OpenAIError(500, f"internal error: {type(exc).__name__}", type_="server_error").body(),
                            status_code=500)

    return api


api = create_api()


@serve.ingress(api)
class Router:
    """Ingress deployment; one instance per router replica."""

    def __init__(self, config: dict, store: str, pools: dict):
        cfg = AppConfig.model_validate(config)
        install_validators()  # uploads are deep-checked before any byte is stored
        registry = Registry(store)
        set_state(RouterState(config=cfg, registry=registry, catalog=Catalog(registry, cfg), pools=pools,
                              metrics=RouterMetrics(), limiter=RateLimiter(cfg.rate_limit_rpm),
                              gate=TenantGate(cfg.tenant_max_in_flight, cfg.request_timeout_s,
                                              cfg.tenant_active_s)))
        log.info("router.ready", pools=list(pools), store=store)
