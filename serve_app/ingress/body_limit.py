"""A size limit on JSON request bodies, enforced while they stream in (before any parsing).

Uploads (``POST /v1/tenants/{tenant}/{kind}/{name}``) have their own streamed limit
(``max_upload_mb`` in the app config); every other body is JSON and is refused with 413, naming
``body``, once it exceeds ``ATELIER_MAX_JSON_BODY_MB`` (default 4 MB): by its ``Content-Length``
when declared, else as soon as the streamed bytes pass the limit. Nothing is parsed or kept.
"""

from __future__ import annotations

import json
import os
import re

from fastapi import HTTPException

from serve_app.ingress.openai_api import OpenAIError

DEFAULT_MAX_MB = 4.0
UPLOAD_PATH = re.compile(r"^/v1/tenants/[^/]+/[^/]+/[^/]+/?$")


def max_json_body_bytes() -> int:
    """The limit in bytes (``ATELIER_MAX_JSON_BODY_MB``, default 4)."""
    return int(float(os.environ.get("ATELIER_MAX_JSON_BODY_MB", DEFAULT_MAX_MB)) * 1024 * 1024)


def too_large_message(size: int, max_bytes: int) -> str:
    return (f"body: {size} bytes is over this server's limit of {max_bytes / 1024 / 1024:g} MB for JSON requests; "
            "fix: send a smaller request (long documents belong in an upload)")


class _TooLarge(HTTPException):
    """Raised from ``receive`` mid-stream; FastAPI re-raises HTTPExceptions from body reading, so the
    app's HTTP error handler answers 413 (``param: body``)."""


class JsonBodyLimit:
    """Pure ASGI middleware: 413 ``param: body`` for JSON bodies over the limit (uploads exempt)."""

    def __init__(self, app, max_bytes: int | None = None):
        self.app, self.max_bytes = app, max_bytes or max_json_body_bytes()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or (
                scope["method"] == "POST" and UPLOAD_PATH.match(scope["path"])):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, too_large_message(seen, self.max_bytes))
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int) -> None:
        err = OpenAIError(413, too_large_message(size, self.max_bytes), param="body")
        payload = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
