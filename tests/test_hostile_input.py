"""Hostile input against the live app: every case of :mod:`tests.hostile_corpus` gets its exact
4xx naming the field, the registry stays byte-identical, nothing is unpickled; then schemathesis
fuzzes every operation of /openapi.json (bounded examples per route) and must see zero 5xx.
A static scan keeps code that could unpickle or execute a file out of the packages."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from ray import serve

from tests.conftest import ROOT, VENV_BIN
from tests.hostile_corpus import Case, cases
from tests.security_fixtures import A, bearer, deploy, http, listing_digest
from tests.serve_fixtures import BASE_URL

APP = "hostile"


@pytest.fixture(scope="module")
def app(ray_session, tiny_model, tmp_path_factory):
    env = deploy(APP, tmp_path_factory.mktemp("hostile"), tiny_model)
    yield env
    serve.delete(APP)


def _send(c, case: Case, keys: dict):
    headers = dict(case.headers)
    if case.caller != "none" and "Authorization" not in headers:
        headers.update(bearer(keys[case.caller if case.caller == "admin" else A]))
    if case.stream:
        def body():
            for _ in range(case.stream // 65536):
                yield b"\0" * 65536
        return c.request(case.method, case.path, headers=headers, content=body())
    if case.files is not None:
        for _, (_, f, _) in case.files:
            f.seek(0)
        return c.request(case.method, case.path, headers=headers, files=case.files, data=case.data)
    if case.content is not None:
        return c.request(case.method, case.path, headers=headers, content=case.content)
    return c.request(case.method, case.path, headers=headers, json=case.json)


def _problems(case: Case, r) -> list[str]:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return [f"not an OpenAI error body: {r.text[:120]}"]
    out = []
    if r.status_code != case.status:
        out.append(f"status {r.status_code}, want {case.status}")
    if set(err) != {"message", "type", "param", "code"}:
        out.append(f"error keys {sorted(err)}")
    if case.param is not None:
        want = case.param.rstrip("*")
        got = err.get("param") or ""
        if not (got.startswith(want) if case.param.endswith("*") else got == want):
            out.append(f"param {got!r}, want {case.param!r}")
    if case.fragment not in (err.get("message") or ""):
        out.append(f"message lacks {case.fragment!r}")
    return [f"{p}: {err.get('message', '')[:140]}" for p in out]


@pytest.mark.ray
def test_hostile_corpus_is_refused_by_name(app, tmp_path, capsys):
    marker = tmp_path / "UNPICKLED"
    adapter = {p.name: p.read_bytes() for p in app["adapters"][(A, "pirate")].iterdir()
               if p.suffix in (".json", ".safetensors")}
    expert = {p.name: p.read_bytes() for p in app["expert_dir"].iterdir() if p.is_file()}
    corpus = cases(adapter, expert, marker)
    failures, rows = [], []
    with http() as c:
        for case in corpus:
            before = listing_digest(app["store"])
            r = _send(c, case, app["keys"])
            problems = _problems(case, r)
            if listing_digest(app["store"]) != before:
                problems.append("the registry changed")
            rows.append((case.id, r.status_code, (r.json().get("error") or {}).get("param") if problems == [] else
                         "FAIL"))
            failures += [f"{case.id}: {p}" for p in problems]
    with capsys.disabled():
        print(f"\nhostile corpus: {len(corpus)} cases, {len(failures)} problems, unpickled: {marker.exists()}")
        for name, status, param in rows:
            print(f"  {status}  {str(param):32s} {name}")
    assert not marker.exists(), "a tenant file was unpickled"
    assert not failures, failures


def targeted_spec(spec: dict) -> dict:
    """The live spec with A's real model and artifact names as the only values of ``model`` and of
    the path's tenant/name, so the fuzzer's requests reach the replicas instead of stopping at 404."""
    spec = json.loads(json.dumps(spec))
    models = ["base", "auto", f"{A}/pirate", f"{A}/survival"]
    for component in ("ChatCompletionRequest", "CompletionRequest"):
        spec["components"]["schemas"][component]["properties"]["model"] = {"type": "string", "enum": models}
    for ops in spec["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["in"] == "path" and param["name"] in ("tenant", "name"):
                    param["schema"] = {"type": "string", "enum": [A] if param["name"] == "tenant" else
                                       ["survival", "pirate", "titanic"]}
    return spec


@pytest.mark.ray
def test_schemathesis_finds_no_server_errors(app, tmp_path, capsys):
    """Fuzz every operation of the live spec: as tenant A with A's real names (reaching the replicas:
    random sampling settings, messages, questions) and as an admin with the spec as published."""
    from tests.security_fixtures import openapi

    targeted = tmp_path / "targeted.json"
    targeted.write_text(json.dumps(targeted_spec(openapi())))
    summary = []
    for who, schema in ((A, str(targeted)), ("admin", f"{BASE_URL}/openapi.json")):
        proc = subprocess.run(
            [str(VENV_BIN / "st"), "run", schema, "--url", BASE_URL, "--checks", "not_a_server_error",
             "--max-examples", "15", "--seed", "20", "--workers", "1", "--max-time", "30",
             "--request-timeout", "60", "--generation-database", "none", "--no-color",
             "--header", f"Authorization: Bearer {app['keys'][who]}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=400)  # st writes .schemathesis/ here
        out = proc.stdout + proc.stderr
        cases = re.findall(r"(\d+) generated, (\d+) passed", out)
        summary.append(f"{who}: exit {proc.returncode}, test cases {cases}")
        assert proc.returncode == 0, f"schemathesis found server errors as {who}:\n{out[-6000:]}"
        assert cases, out[-2000:]
    with capsys.disabled():
        print("\nschemathesis:", "; ".join(summary))


FORBIDDEN = re.compile(r"\b(pickle\.loads?|cPickle\.loads?|cloudpickle\.loads?|dill\.loads?|joblib\.load|"
                       r"torch\.load|numpy\.load|np\.load|marshal\.loads?|shelve\.open|yaml\.load|"
                       r"yaml\.unsafe_load|Unpickler)\(|(?<![\w.])(eval|exec|__import__)\(")


def test_no_package_can_unpickle_or_execute_a_file():
    """Tenant artifacts are data: no package code calls an unpickler, eval/exec or an unsafe YAML loader."""
    hits = []
    for package in ("cluster", "serve_app", "train_jobs", "compression", "llamdex"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if FORBIDDEN.search(code) and "safe_load" not in code:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


def test_corpus_pickles_are_live_exploits(tmp_path):
    """The corpus is only meaningful if unpickling its files really would run code."""
    import io
    import pickle

    import torch
    from safetensors.torch import save

    marker = tmp_path / "UNPICKLED"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tiny = save({f"{prefix}.lora_A.weight": torch.zeros(2, 4), f"{prefix}.lora_B.weight": torch.zeros(4, 2)})
    corpus = cases({"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": tiny},
                   {"expert.json": b"{}", "expert.safetensors": tiny}, marker)
    case = next(c for c in corpus if c.id == "pickle .bin")
    payload = next(f.getvalue() for _, (name, f, _) in case.files if name == "adapter_model.bin")
    pickle.load(io.BytesIO(payload))  # on purpose: our own exploit, to prove it is one
    assert marker.exists()
