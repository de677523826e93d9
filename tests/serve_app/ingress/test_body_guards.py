"""The router's HTTP body guards, in-process on the real FastAPI app (no Ray): JSON bodies over the
size limit get 413 before parsing (declared or streamed), malformed or over-deep JSON names
``body``; uploads keep their own limit."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from serve_app.ingress.body_limit import UPLOAD_PATH, JsonBodyLimit
from serve_app.ingress.router import create_api

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client():
    return TestClient(create_api(), raise_server_exceptions=False)


def error(r) -> dict:
    return r.json()["error"]


def test_json_over_the_limit_is_refused_by_its_declared_length(client, monkeypatch):
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": "a" * 5_000_000}]})
    r = client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error(r)["param"] == "body" and "over this server's limit of 4 MB" in error(r)["message"]


def test_json_over_the_limit_is_refused_while_streaming():
    seen = []

    async def app(scope, receive, send):  # reads the whole body, like FastAPI does
        while (m := await receive())["more_body"]:
            seen.append(len(m["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = iter([b"x" * 600, b"x" * 600, b"x" * 600])

    def gen():
        yield from chunks

    r = TestClient(JsonBodyLimit(app, max_bytes=1000)).post("/v1/completions", content=gen())
    assert r.status_code == 413 and error(r)["param"] == "body"
    assert sum(seen) <= 1000  # refused on the chunk that crossed the limit, nothing after it was read


def test_malformed_and_deep_json_name_the_body(client):
    r = client.post(CHAT, content=b'{"model": "base", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and error(r)["param"] == "body" and "invalid JSON at byte" in error(r)["message"]
    r = client.post(CHAT, content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and error(r)["param"] == "body" and "could not be parsed" in error(r)["message"]


def test_uploads_are_exempt_from_the_json_limit():
    assert UPLOAD_PATH.match("/v1/tenants/acme/adapter/pirate")
    assert not UPLOAD_PATH.match("/v1/chat/completions") and not UPLOAD_PATH.match("/v1/experts/acme/x/predict")
