"""Hostile inputs, each with the refusal it must get: an exact status and the field it names.

Built in memory from tenant A's real, valid artifacts (so each case differs from an accepted
upload in exactly the way it names). The pickles are real exploits: unpickling one creates a
marker file, which the test then checks does not exist. :func:`cases` is the corpus.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.security_fixtures import QUESTION, SCHEMA, A


@dataclass
class Case:
    id: str
    method: str
    path: str
    status: int
    param: str | None
    """Expected ``error.param``; a trailing '*' matches a prefix; None: not checked (see the test)."""
    fragment: str
    """Expected in ``error.message``."""
    caller: str = "A"
    json: Any = None
    content: bytes | None = None
    files: list | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    stream: int = 0
    """Send this many bytes as a chunked body (no Content-Length header)."""


class _Exploit:
    """Unpickling this creates ``path``: proof that something unpickled a tenant file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _parts(files: dict[str, bytes]) -> list:
    return [("files", (name, io.BytesIO(data), "application/octet-stream")) for name, data in files.items()]


def _tensors_with(data: bytes, change) -> bytes:
    tensors = dict(st_load(data))
    change(tensors)
    return st_save(tensors)


def _lying_header(entries: dict, payload: bytes) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + payload


def upload_cases(adapter: dict[str, bytes], expert: dict[str, bytes], marker: Path) -> list[Case]:
    """Artifact uploads to A's own namespace that must be refused."""
    evil = pickle.dumps({"lora": _Exploit(marker)})
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": _Exploit(marker)}, buf)
    torch_zip = buf.getvalue()
    first = next(iter(st_load(adapter["adapter_model.safetensors"])))  # ...q_proj.lora_A.weight
    lora_a = next(k for k in st_load(adapter["adapter_model.safetensors"]) if "lora_A" in k)
    cfg = json.loads(adapter["adapter_config.json"])

    def adapter_with(**files) -> list:
        return _parts({**adapter, **files})

    def tensors(change) -> bytes:
        return _tensors_with(adapter["adapter_model.safetensors"], change)

    def widen(t):
        t[lora_a] = torch.zeros(t[lora_a].shape[0], t[lora_a].shape[1] + 1)

    def poison(value):
        def change(t):
            t[first] = t[first].clone()
            t[first][0, 0] = value
        return change

    padded = st_save(dict(st_load(adapter["adapter_model.safetensors"])), metadata={"pad": "x" * (1 << 20)})
    up = f"/v1/tenants/{A}/adapters"
    ex = f"/v1/tenants/{A}/experts"
    expert_tensors = dict(st_load(expert["expert.safetensors"]))
    wkey = next(iter(expert_tensors))

    def expert_with(weights: dict) -> dict[str, bytes]:
        """The expert with other weights, its declared hash updated: only the weights are wrong."""
        data = st_save(weights)
        spec = {**json.loads(expert["expert.json"]), "weights_sha256": hashlib.sha256(data).hexdigest()}
        return {"expert.json": json.dumps(spec).encode(), "expert.safetensors": data}
    return [
        Case("pickle .bin", "post", f"{up}/p1", 422, "files", "adapter_model.bin not allowed",
             files=_parts({"adapter_config.json": adapter["adapter_config.json"], "adapter_model.bin": evil})),
        Case("pickle renamed .safetensors", "post", f"{up}/p2", 422, "files", "adapter_model.safetensors: ",
             files=adapter_with(**{"adapter_model.safetensors": evil})),
        Case("torch.save zip renamed .safetensors", "post", f"{up}/p3", 422, "files", "adapter_model.safetensors",
             files=adapter_with(**{"adapter_model.safetensors": torch_zip})),
        Case("expert pickle renamed .safetensors", "post", f"{ex}/p4", 422, "files", "expert.safetensors",
             files=_parts({**expert, "expert.safetensors": evil})),
        Case("safetensors header length 2**64-1", "post", f"{up}/h1", 422, "files", "safetensors header",
             files=adapter_with(**{"adapter_model.safetensors": b"\xff" * 8 + b"{}"})),
        Case("safetensors header lies about offsets", "post", f"{up}/h2", 422, "files",
             "adapter_model.safetensors: not a valid safetensors", files=adapter_with(**{
                 "adapter_model.safetensors": _lying_header(
                     {first: {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, b"\0" * 16)})),
        Case("safetensors header of 1 MiB padding", "post", f"{up}/h3", 422, "files", "safetensors header of",
             files=adapter_with(**{"adapter_model.safetensors": padded})),
        Case("adapter shape fits no pool", "post", f"{up}/s1", 422, "files", "fits no pool",
             files=adapter_with(**{"adapter_model.safetensors": tensors(widen)})),
        Case("adapter rank contradicts config r", "post", f"{up}/s2", 422, "files", "'r'",
             files=adapter_with(**{"adapter_config.json": json.dumps({**cfg, "r": cfg["r"] * 2}).encode()})),
        Case("adapter int32 factors", "post", f"{up}/d1", 422, "files", "dtype",
             files=adapter_with(**{"adapter_model.safetensors": tensors(
                 lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))})),
        Case("adapter bool tensor", "post", f"{up}/d2", 422, "files", "dtype",
             files=adapter_with(**{"adapter_model.safetensors": tensors(
                 lambda t: t.update({first: t[first] > 0}))})),
        Case("adapter NaN weight", "post", f"{up}/n1", 422, "files", "NaN or Inf",
             files=adapter_with(**{"adapter_model.safetensors": tensors(poison(float("nan")))})),
        Case("adapter Inf weight", "post", f"{up}/n2", 422, "files", "NaN or Inf",
             files=adapter_with(**{"adapter_model.safetensors": tensors(poison(float("inf")))})),
        Case("adapter unknown tensor key", "post", f"{up}/k1", 422, "files", "unexpected tensor key",
             files=adapter_with(**{"adapter_model.safetensors": tensors(
                 lambda t: t.update({"evil": torch.zeros(2, 2)}))})),
        Case("expert tensor of the wrong shape", "post", f"{ex}/e1", 422, "files", wkey,
             files=_parts(expert_with({**expert_tensors, wkey: torch.zeros(
                 *[s + 1 for s in expert_tensors[wkey].shape])}))),
        Case("expert NaN weight", "post", f"{ex}/e2", 422, "files", "NaN",
             files=_parts(expert_with({**expert_tensors, wkey: torch.full_like(expert_tensors[wkey], float("nan"))}))),
        Case("expert weights differ from their declared hash", "post", f"{ex}/e5", 422, "files", "SHA-256",
             files=_parts({**expert, "expert.safetensors": st_save(
                 {**expert_tensors, wkey: expert_tensors[wkey] + 1})})),
        Case("expert.json is a list", "post", f"{ex}/e3", 422, "files", "expert.json",
             files=_parts({**expert, "expert.json": b"[1, 2]"})),
        Case("expert schema_name is a path", "post", f"{ex}/e4", 422, "files", "schema_name",
             files=_parts({**expert, "expert.json": json.dumps(
                 {**json.loads(expert["expert.json"]), "schema_name": "../../keys"}).encode()})),
        Case("oversized upload", "post", f"{up}/big", 413, "files", "exceeds",
             files=adapter_with(**{"adapter_model.safetensors": b"\0" * (3 << 20)})),
        Case("oversized upload without content-length", "post", f"{up}/big2", 413, "files", "exceeds",
             stream=3 << 20, headers={"content-type": "application/json"}),
        Case("missing weights file", "post", f"{up}/m1", 422, "files", "missing adapter_model.safetensors",
             files=_parts({"adapter_config.json": adapter["adapter_config.json"]})),
        Case("extra executable file", "post", f"{up}/m2", 422, "files", "run.py not allowed",
             files=adapter_with(**{"run.py": b"import os; os.system('id')"})),
        Case("config is not JSON", "post", f"{up}/c1", 422, "files", "adapter_config.json: not valid UTF-8 JSON",
             files=adapter_with(**{"adapter_config.json": b"{'r': 4"})),
        Case("config is a JSON list", "post", f"{up}/c2", 422, "files", "top level must be a JSON object",
             files=adapter_with(**{"adapter_config.json": b"[]"})),
        Case("file name with path traversal", "post", f"{up}/f1", 422, "files", "not allowed",
             files=_parts({"../../keys/adapter_config.json": adapter["adapter_config.json"],
                           "adapter_model.safetensors": adapter["adapter_model.safetensors"]})),
        Case("file name with a Greek omicron", "post", f"{up}/f2", 422, "files", "not allowed",
             files=_parts({"adapter_c\u03bfnfig.json": adapter["adapter_config.json"],
                           "adapter_model.safetensors": adapter["adapter_model.safetensors"]})),
        Case("absolute file name", "post", f"{up}/f3", 422, "files", "not allowed",
             files=_parts({**adapter, "/etc/passwd": b"root"})),
        Case("same file twice", "post", f"{up}/f4", 400, "files", "sent twice",
             files=_parts(adapter) + _parts({"adapter_config.json": b"{}"})),
        Case("JSON upload: traversal file name", "post", f"{up}/j1", 422, "files", "not allowed",
             json={"files": {"../../keys/x.json": base64.b64encode(b"{}").decode()}}),
        Case("JSON upload: file is not base64", "post", f"{up}/j2", 400, "files.*", "not valid base64",
             json={"files": {"adapter_config.json": "%%%"}}),
        Case("JSON upload: files is a list", "post", f"{up}/j3", 400, "files", "files must be an object",
             json={"files": ["adapter_config.json"]}),
        Case("JSON upload: metadata is a string", "post", f"{up}/j4", 400, "metadata", "metadata",
             json={"files": {k: base64.b64encode(v).decode() for k, v in adapter.items()}, "metadata": "x"}),
        Case("JSON upload nested 5000 deep", "post", f"{up}/j5", 400, "body", "not valid JSON",
             content=b'{"files": {}, "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
             headers={"content-type": "application/json"}),
        Case("multipart without boundary", "post", f"{up}/mp1", 400, "body", "malformed multipart",
             content=b"garbage", headers={"content-type": "multipart/form-data"}),
        Case("multipart unexpected text field", "post", f"{up}/mp2", 400, "evil", "unexpected form field",
             files=_parts(adapter), data={"evil": "1"}),
        Case("multipart metadata not JSON", "post", f"{up}/mp3", 400, "metadata", "metadata is not valid JSON",
             files=_parts(adapter), data={"metadata": "{nope"}),
        Case("unsupported content type", "post", f"{up}/ct", 415, "content-type", "not supported",
             content=b"hello", headers={"content-type": "text/plain"}),
    ]


def schema_cases() -> list[Case]:
    def bad(change) -> dict:
        s = copy.deepcopy(SCHEMA)
        change(s)
        return s

    path = f"/v1/tenants/{A}/schemas"
    return [
        Case("schema range lo > hi", "post", f"{path}/r1", 422, "files", "features[0].range",
             json=bad(lambda s: s["features"][0].update(range=[100, 0]))),
        Case("schema infinite range", "post", f"{path}/r2", 422, "files", "features[1].range",
             content=json.dumps(bad(lambda s: s["features"][1].update(range=[0, "INF"]))).replace('"INF"', "1e999")
             .encode(), headers={"content-type": "application/json"}),
        Case("schema empty categories", "post", f"{path}/r3", 422, "files", "features[2].categories",
             json=bad(lambda s: s["features"][2].update(categories=[]))),
        Case("schema duplicate feature names", "post", f"{path}/r4", 422, "files", "duplicate feature name",
             json=bad(lambda s: s["features"].append(dict(s["features"][0])))),
        Case("schema duplicate classes", "post", f"{path}/r5", 422, "files", "target.classes",
             json=bad(lambda s: s["target"].update(classes=[{"name": "no"}, {"name": "no"}]))),
        Case("schema feature name with RTL override", "post", f"{path}/r6", 422, "files", "features[0].name",
             json=bad(lambda s: s["features"][0].update(name="age\u202egpj"))),
        Case("schema is a JSON list", "post", f"{path}/r7", 400, "body", "must be a JSON object", json=[SCHEMA]),
    ]


def name_cases(adapter: dict[str, bytes]) -> list[Case]:
    ok = {"files": {k: base64.b64encode(v).decode() for k, v in adapter.items()}}
    out = []
    for label, name in [("uppercase", "Pirate"), ("accented", "p%C3%AFrate"), ("fullwidth", "%EF%BD%90irate"),
                        ("RTL override", "pirate%E2%80%AE"), ("zero-width joiner", "pi%E2%80%8Drate"),
                        ("65 chars", "a" * 65), ("space", "pi%20rate"), ("dot-dot", "%2E%2E"),
                        ("NUL", "pirate%00")]:
        out.append(Case(f"artifact name: {label}", "post", f"/v1/tenants/{A}/adapters/{name}", 400, "name",
                        "is not a valid name", json=ok))
    for label, tenant, caller, status in [("dot-dot, tenant key", "%2E%2E", "A", 403),
                                          ("uppercase, tenant key", "ACME", "A", 403),
                                          ("dot-dot, admin key", "%2E%2E", "admin", 404),
                                          ("fullwidth, admin key", "%EF%BD%87lobex", "admin", 404)]:
        out.append(Case(f"tenant in path: {label}", "post", f"/v1/tenants/{tenant}/adapters/x", status, "tenant",
                        "tenant", caller=caller, json=ok))
        out.append(Case(f"tenant listing: {label}", "get", f"/v1/tenants/{tenant}/artifacts", status, "tenant",
                        "tenant", caller=caller))
    for label, tid in [("path", "../x"), ("fullwidth", "\uff41cme"), ("too long", "a" * 40), ("reserved", "system"),
                       ("RTL", "ab\u202ec")]:
        out.append(Case(f"new tenant id: {label}", "post", "/v1/admin/tenants", 400, "id", "tenant", caller="admin",
                        json={"id": tid}))
    out.append(Case("new tenant id not a string", "post", "/v1/admin/tenants", 422, "id", "string", caller="admin",
                    json={"id": 5}))
    out.append(Case("new tenant with extra field", "post", "/v1/admin/tenants", 422, "admin", "Extra inputs",
                    caller="admin", json={"id": "newco", "admin": True}))
    out.append(Case("key for unknown tenant", "post", "/v1/admin/tenants/ghost/keys", 404, "tenant",
                    "does not exist", caller="admin"))
    return out


def generation_cases() -> list[Case]:
    msgs = [{"role": "user", "content": "hello"}]

    def chat(**over) -> dict:
        return {"model": "base", "messages": msgs, "max_tokens": 2, **over}

    def raw(text: str) -> bytes:
        return ('{"model": "base", "messages": [{"role": "user", "content": "hi"}], ' + text + "}").encode()

    c, p = "/v1/chat/completions", "/v1/completions"
    js = {"content-type": "application/json"}
    return [
        Case("huge prompt (1 MB) to chat", "post", c, 400, "messages", "tokens",
             json=chat(messages=[{"role": "user", "content": "pirate " * 150_000}])),
        Case("huge prompt (1 MB) to completions", "post", p, 400, "prompt", "tokens",
             json={"model": "base", "prompt": "pirate " * 150_000, "max_tokens": 2}),
        Case("n = 1000", "post", c, 422, "n", "only n=1", json=chat(n=1000)),
        Case("n = 0", "post", c, 422, "n", "only n=1", json=chat(n=0)),
        Case("max_tokens = 10**12", "post", c, 400, "max_tokens", "exceeds", json=chat(max_tokens=10**12)),
        Case("max_tokens = 10**30", "post", c, 400, "max_tokens", "exceeds", json=chat(max_tokens=10**30)),
        Case("max_tokens negative", "post", c, 422, "max_tokens", "greater than or equal to 1",
             json=chat(max_tokens=-5)),
        Case("max_tokens fractional", "post", c, 422, "max_tokens", "integer", json=chat(max_tokens=1.5)),
        Case("negative top_p", "post", c, 422, "top_p", "greater than 0", json=chat(top_p=-0.5)),
        Case("top_p NaN", "post", c, 422, "top_p", "top_p", content=raw('"top_p": NaN'), headers=js),
        Case("temperature Infinity", "post", c, 422, "temperature", "temperature",
             content=raw('"temperature": Infinity'), headers=js),
        Case("negative temperature", "post", c, 422, "temperature", "greater than or equal to 0",
             json=chat(temperature=-1)),
        Case("5000 stop strings", "post", c, 400, "stop", "at most 16", json=chat(stop=[f"s{i}" for i in range(5000)])),
        Case("100k-char stop string", "post", c, 400, "stop", "at most 256", json=chat(stop="x" * 100_000)),
        Case("empty stop string", "post", c, 400, "stop", "non-empty", json=chat(stop=[""])),
        Case("stop is a number", "post", c, 422, "stop*", "stop", json=chat(stop=5)),
        Case("seed beyond 64 bits", "post", c, 400, "seed", "64-bit", json=chat(seed=2**70)),
        Case("content is a number", "post", c, 422, "messages.0.content*", "content",
             json=chat(messages=[{"role": "user", "content": 123}])),
        Case("content is an object", "post", c, 422, "messages.0.content*", "content",
             json=chat(messages=[{"role": "user", "content": {"text": "hi"}}])),
        Case("text part whose text is a number", "post", c, 400, "messages[0].content[0].text", "must be a string",
             json=chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])),
        Case("image part", "post", c, 400, "messages*", "not supported",
             json=chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                               "image_url": {"url": "http://x/y.png"}}]}])),
        Case("content part is a number", "post", c, 422, "messages.0.content*", "content",
             json=chat(messages=[{"role": "user", "content": [5]}])),
        Case("unknown role", "post", c, 422, "messages.0.role", "role",
             json=chat(messages=[{"role": "root", "content": "hi"}])),
        Case("messages is a string", "post", c, 422, "messages", "messages", json=chat(messages="hi")),
        Case("no messages", "post", c, 422, "messages", "messages", json=chat(messages=[])),
        Case("token-id prompt", "post", p, 422, "prompt*", "prompt", json={"model": "base", "prompt": [1, 2, 3]}),
        Case("two prompts", "post", p, 422, "prompt", "exactly one prompt", json={"model": "base", "prompt": ["a", "b"]}),
        Case("empty prompt", "post", p, 400, "prompt", "must not be empty", json={"model": "base", "prompt": ""}),
        Case("tools", "post", c, 400, "tools", "not supported",
             json=chat(tools=[{"type": "function", "function": {"name": "rm"}}])),
        Case("logprobs", "post", c, 400, "logprobs", "not supported", json=chat(logprobs=True)),
        Case("logit_bias", "post", c, 400, "logit_bias", "not supported", json=chat(logit_bias={"42": 100})),
        Case("empty model", "post", c, 422, "model", "model", json=chat(model="")),
        Case("model is a number", "post", c, 422, "model", "model", json=chat(model=5)),
        Case("model id of 100k chars", "post", c, 404, "model", "does not exist", json=chat(model="m" * 100_000)),
        Case("admin: model with path traversal", "post", c, 404, "model", "does not exist", caller="admin",
             json=chat(model="../../keys")),
        Case("malformed JSON", "post", c, 422, "body", "invalid JSON at byte", content=b'{"model": "base", "messages": [',
             headers=js),
        Case("JSON nested 100000 deep", "post", c, 400, "body", "could not be parsed as JSON", content=b"[" * 100_000,
             headers=js),
        Case("predict: question is a number", "post", f"/v1/experts/{A}/survival/predict", 422, "question",
             "string", json={"question": 5}),
        Case("predict: empty question", "post", f"/v1/experts/{A}/survival/predict", 422, "question", "question",
             json={"question": ""}),
        Case("predict: 30k-char question", "post", f"/v1/experts/{A}/survival/predict", 422, "question",
             "at most 20000", json={"question": QUESTION * 400}),
        Case("predict: extra field", "post", f"/v1/experts/{A}/survival/predict", 422, "features", "Extra inputs",
             json={"question": QUESTION, "features": {"age": 3}}),
        Case("JSON body of 5 MB", "post", c, 413, "body", "over this server's limit",
             json=chat(messages=[{"role": "user", "content": "a" * 5_000_000}])),
        Case("10 KB bearer key", "get", "/v1/models", 401, None, "not an Atelier API key", caller="none",
             headers={"Authorization": "Bearer " + "k" * 10_000}),
    ]


def cases(adapter: dict[str, bytes], expert: dict[str, bytes], marker: Path) -> list[Case]:
    return upload_cases(adapter, expert, marker) + schema_cases() + name_cases(adapter) + generation_cases()
