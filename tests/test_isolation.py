"""Tenant isolation, as a matrix built from the live app's OpenAPI spec.

Every operation in ``/openapi.json`` is tried with no key, a bogus key, tenant A's key against
tenant B's artifacts of every kind (in the path and in the body's ``model``), and an admin-only
operation with tenant keys. A new route is covered without editing this file; a route whose
body or path parameter this file cannot fill fails the test instead of being skipped.

A *leak* is: a 2xx answer to a request naming B's artifact from anyone but B or an admin, any
answer to someone else that contains B's canary text (written into every description B
uploaded) or a raw API key, or a change in the registry's bytes. Leaks must be 0. Then the keys
are looked for (and must not be found) in the store and in every log file the run produced.
"""

from __future__ import annotations

import io
import itertools
import json
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ray import serve

from cluster.artifacts import ArtifactKind
from serve_app.ingress.routes_manage import UPLOAD_KINDS
from tests.security_fixtures import QUESTION, A, B, bearer, deploy, http, listing_digest, openapi
from tests.serve_fixtures import greedy_with_peft

pytestmark = pytest.mark.ray
APP = "isolation"
PUBLIC = {("get", "/healthz")}
"""Operations in the spec that need no key; FastAPI's /docs, /redoc and /openapi.json are not in it."""
DOCS = ["/docs", "/redoc", "/openapi.json"]


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    env = deploy(APP, tmp_path_factory.mktemp("isolation"), tiny_model)
    yield env
    serve.delete(APP)


# ---------------------------------------------------------------------------- request bodies
def _chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "temperature": 0}


def _completion(model: str) -> dict:
    return {"model": model, "prompt": QUESTION, "max_tokens": 2, "temperature": 0}


BODIES = {
    # schema component -> (names a model?, builder(model id or None))
    "ChatCompletionRequest": (True, _chat),
    "CompletionRequest": (True, _completion),
    "PredictRequest": (False, lambda _: {"question": QUESTION}),
    "NewTenant": (False, lambda _: {"id": "mallory"}),
    # feedback naming B's model as the right one, on a response id A does not have
    "FeedbackRequest": (True, lambda m: {"id": "chatcmpl-isolation", "right_model": m}),
}


def _upload_files(env: dict, kind: str) -> list[tuple[str, tuple[str, io.BytesIO, str]]]:
    """A's own valid files of ``kind``: what an overwrite of B's artifact would send."""
    from tests.security_fixtures import SCHEMA

    art = UPLOAD_KINDS.get(kind)
    if art == ArtifactKind.schema:
        blobs = {"schema.json": json.dumps(SCHEMA).encode()}
    elif art == ArtifactKind.expert:
        blobs = {p.name: p.read_bytes() for p in env["expert_dir"].iterdir() if p.is_file()}
    elif art == ArtifactKind.connectors:
        blobs = {p.name: p.read_bytes() for p in env["connectors_dir"].iterdir() if p.is_file()}
    else:
        blobs = {p.name: p.read_bytes() for p in env["adapters"][(A, "pirate")].iterdir()
                 if p.suffix in (".json", ".safetensors")}
    return [("files", (n, io.BytesIO(b), "application/octet-stream")) for n, b in sorted(blobs.items())]


@dataclass
class Attempt:
    caller: str  # "none" | "bogus" | "A" | "B" | "admin"
    method: str
    template: str
    path: str
    json_body: dict | None = None
    upload_kind: str | None = None
    names_victim: bool = False  # the request names one of B's artifacts (path or body)
    expect: set[int] = field(default_factory=set)  # empty: a control, any status is recorded
    headers: dict = field(default_factory=dict)


def build_matrix(spec: dict, env: dict) -> list[Attempt]:
    """Every operation of the spec × every way to point it at B's artifacts × every caller."""
    names = sorted({n for ns in env["victim_names"].values() for n in ns})
    kinds = sorted(set(UPLOAD_KINDS) | {k.value for k in ArtifactKind} | {"models"})
    victim_models = [f"{B}/{n}" for n in names] + ["system/small", f"{B}/ghost"]
    attempts: list[Attempt] = []
    for template, ops in spec["paths"].items():
        for method, op in ops.items():
            schemes = {s for req in op.get("security") or [] for s in req}
            public = (method, template) in PUBLIC
            assert public or schemes, f"{method.upper()} {template} declares no security scheme and is not public"
            admin_only = schemes == {"AdminKey"}
            assert admin_only == template.startswith("/v1/admin/"), f"{template}: admin scheme and path disagree"
            params = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            unknown = set(params) - {"tenant", "name", "kind"}
            assert not unknown, f"{template}: add values for path parameters {unknown} to this test"
            values = {"tenant": [B, "system"], "name": names, "kind": kinds}
            body_ref = (((op.get("requestBody") or {}).get("content") or {}).get("application/json") or {}) \
                .get("schema", {}).get("$ref", "")
            component = body_ref.rsplit("/", 1)[-1] if body_ref else None
            assert component is None or component in BODIES, f"{template}: add a body for {component} to BODIES"
            names_model, builder = BODIES.get(component, (False, None))
            for combo in itertools.product(*(values[p] for p in params)):
                path = template
                for p, v in zip(params, combo, strict=True):
                    path = path.replace("{" + p + "}", v)
                kind = dict(zip(params, combo, strict=True)).get("kind")
                upload = kind if method == "post" and component is None and kind else None
                bodies = [builder(m) for m in victim_models] if names_model else \
                    [builder(None) if builder else None]
                for body in bodies:
                    victim = bool(params and "tenant" in params) or names_model
                    common = dict(method=method, template=template, path=path, json_body=body, upload_kind=upload,
                                  names_victim=victim)
                    if public:
                        attempts.append(Attempt("none", expect={200}, **common))
                        continue
                    attempts.append(Attempt("none", expect={401}, **common))
                    attempts.append(Attempt("bogus", expect={401}, **common))
                    if admin_only:
                        attempts.append(Attempt("A", expect={403}, **common))
                        attempts.append(Attempt("B", expect={403}, **common))
                    elif victim:
                        attempts.append(Attempt("A", expect={403, 404}, **common))
                        if method == "get" or not upload:
                            attempts.append(Attempt("B", **common))  # control: B may use its own
                    else:
                        attempts.append(Attempt("A", expect={200}, **common))  # a listing: checked for canaries
    # admin-only upload kind: a tenant may not publish connectors, even into its own namespace
    for name in names:
        attempts.append(Attempt("A", "post", "/v1/tenants/{tenant}/{kind}/{name}", f"/v1/tenants/{A}/connectors/{name}",
                                upload_kind="connectors", expect={403}))
    # auto must never choose B's customization, however well the prompt matches B's descriptions
    auto = _chat("auto")
    auto["messages"][0]["content"] = f"{env['canary']} ledger survival payroll pirate adapter"
    attempts.append(Attempt("A", "post", "/v1/chat/completions", "/v1/chat/completions", json_body=auto,
                            expect={200}))
    # Serve's multiplexing header must not smuggle B's expert into A's base request
    attempts.append(Attempt("A", "post", "/v1/chat/completions", "/v1/chat/completions", json_body=_chat("base"),
                            expect={200}, headers={"serve_multiplexed_model_id": f"{B}/survival@e1.c1"}))
    return attempts


def run(attempt: Attempt, env: dict, client, bogus: str):
    keys = env["keys"]
    headers = dict(attempt.headers)
    if attempt.caller != "none":
        headers.update(bearer({"bogus": bogus, "A": keys[A], "B": keys[B], "admin": keys["admin"]}[attempt.caller]))
    if attempt.upload_kind:
        return client.request(attempt.method, attempt.path, headers=headers,
                              files=_upload_files(env, attempt.upload_kind))
    return client.request(attempt.method, attempt.path, headers=headers, json=attempt.json_body)


def leaks_of(attempt: Attempt, status: int, text: str, env: dict, secrets_: list[str]) -> list[str]:
    found = []
    if attempt.caller in ("B", "admin"):
        return found
    if 200 <= status < 300 and attempt.names_victim:
        found.append(f"{status} for a request naming {B}'s artifact")
    if env["canary"] in text:
        found.append("B's canary in the response")
    if f'"{B}/' in text and not attempt.names_victim:
        found.append(f"a {B}/ model id in a response to a request that did not name one")
    found += [f"a raw API key in the response ({s[:8]}…)" for s in secrets_ if s in text]
    asked = (attempt.json_body or {}).get("model")
    if asked in ("auto", "base") and status == 200:
        body = json.loads(text)
        if body.get("model", "").startswith(f"{B}/"):
            found.append(f"model={asked} answered with {body['model']}")
        if asked == "base" and (body.get("model") != "base" or (body.get("atelier") or {}).get("prediction")):
            found.append(f"model=base answered as {body.get('model')} with an expert prediction")
    return found


def test_isolation_matrix_from_openapi(app, capsys):
    spec = openapi()
    attempts = build_matrix(spec, app)
    before = listing_digest(app["store"], own_tenant=A)
    bogus = "atl_" + secrets.token_urlsafe(32)
    secrets_ = [*app["keys"].values(), bogus]
    wrong, leaks, controls = [], [], Counter()
    by_row: Counter = Counter()
    with http() as c:
        for doc in DOCS:
            assert c.get(doc).status_code == 200, doc
        for att in attempts:
            r = run(att, app, c, bogus)
            by_row[(att.caller, f"{att.method.upper()} {att.template}")] += 1
            for leak in leaks_of(att, r.status_code, r.text, app, secrets_):
                leaks.append(f"{att.caller} {att.method.upper()} {att.path} {att.json_body or ''}: {leak}")
            if att.expect and r.status_code not in att.expect:
                wrong.append(f"{att.caller} {att.method.upper()} {att.path} {att.json_body or ''} "
                             f"-> {r.status_code} (want {sorted(att.expect)}): {r.text[:160]}")
            if not att.expect:
                controls[(f"{att.method.upper()} {att.template}", r.status_code)] += 1
            if r.status_code >= 400:
                err = r.json().get("error", {})
                assert set(err) == {"message", "type", "param", "code"}, r.text
    after = listing_digest(app["store"], own_tenant=A)
    with capsys.disabled():
        print(f"\nisolation matrix: {len(spec['paths'])} paths, {len(attempts)} attempts, "
              f"{len(leaks)} leaks, {len(wrong)} unexpected statuses")
        for (caller, op), n in sorted(by_row.items()):
            print(f"  {caller:6s} {op:48s} {n:4d}")
        print(f"  controls (B on its own artifacts): {dict(controls)}")
    assert not leaks, leaks[:10]
    assert not wrong, wrong[:10]
    assert before == after, "the registry changed during the attacks"
    # the controls prove the requests were well formed: B itself gets its data with them
    assert controls[("GET /v1/tenants/{tenant}/artifacts", 200)] == 1
    assert controls[("POST /v1/chat/completions", 200)] >= 3  # B's expert and both adapters
    assert controls[("POST /v1/experts/{tenant}/{name}/predict", 200)] == 1
    with http() as c:
        listed = c.get(f"/v1/tenants/{B}/artifacts", headers=bearer(app["keys"][B])).text
    assert app["canary"] in listed, "the canary must be visible to its owner, or the leak check proves nothing"


def test_same_name_in_two_tenants_answers_with_the_callers_adapter(app, tmp_path):
    """acme/pirate and globex/pirate share a name: each tenant gets its own adapter's answer."""
    from cluster.banks import read_bank
    from compression import export_adapter

    bank, _ = read_bank(app["registry"], "small")
    msgs = [{"role": "user", "content": "Tell me about pirates and ships."}]
    refs = {t: greedy_with_peft(app["model"].path, export_adapter(bank, f"{t}/pirate", tmp_path / t), msgs, 6)
            for t in (A, B)}
    assert refs[A] != refs[B], "the two adapters must answer differently for this test to mean anything"
    with http() as c:
        for t in (A, B):
            r = c.post("/v1/chat/completions", headers=bearer(app["keys"][t]),
                       json={"model": f"{t}/pirate", "messages": msgs, "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == refs[t], r.text


def test_keys_are_stored_hashed_and_never_logged(app):
    """No raw key in the store or in any log file of this Ray session (driver, proxy, router, replicas)."""
    import ray

    with http() as c:  # a failed login with a well-formed key must not log the key either
        bogus = "atl_" + secrets.token_urlsafe(32)
        assert c.get("/v1/models", headers=bearer(bogus)).status_code == 401
        minted = c.post(f"/v1/admin/tenants/{A}/keys", headers=bearer(app["keys"]["admin"])).json()["api_key"]
        assert c.get("/v1/models", headers=bearer(minted)).status_code == 200
    keys = [*app["keys"].values(), bogus, minted]
    store_files = [p for p in Path(app["store"]).rglob("*") if p.is_file()]
    key_files = [p.stem for p in (Path(app["store"]) / "keys").iterdir()]
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in key_files)
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    log_files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert any("Router" in p.name for p in log_files), "the router replica's own log was not among those scanned"
    hits = [(str(p), k[:8]) for p in store_files + log_files for k in keys
            if k.encode() in p.read_bytes()]
    print(f"\nscanned {len(store_files)} store files and {len(log_files)} log files for {len(keys)} keys: "
          f"{len(hits)} hits")
    assert not hits, hits[:5]
