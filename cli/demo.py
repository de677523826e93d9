"""``make demo``: the main job end to end on the embedded default model, as users run it.

1. start the local Ray head (``atelier up``) and resolve SmolLM2-135M-Instruct;
2. register tenant ``demo`` (a fresh API key is printed) and publish the titanic schema;
3. tenant side: ``ray job submit -- python -m train_jobs.experts`` trains a DP expert (ε = 1) on
   the titanic training split, standing in for the tenant's private data;
4. server side: ``ray job submit -- python -m train_jobs.connectors`` trains the connectors from
   the schema and the expert artifact only, within ``--budget`` seconds;
5. deploy the Serve app (``atelier serve``) and ask the expert over HTTP: an OpenAI chat
   completion with ``model="demo/survival"`` and ``POST /v1/experts/demo/survival/predict``.

Steps 3-4 are skipped when their artifacts exist and are current (the expert's schema, the connectors'
llamdex code and expert version: :func:`llamdex.provenance.stale_reason`); ``--retrain`` forces them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cluster import local
from cluster.models import resolve_model
from cluster.registry import NotFound, Registry
from cluster.settings import Settings
from llamdex.provenance import source_fingerprint, stale_reason
from llamdex.schema import load_schema

DEMO_TENANT = "demo"
EXPERT = "survival"
ROOT = Path(__file__).resolve().parent.parent
# everyday words, as users write them ("a woman", "3rd class", "no siblings"); each with what it says,
# so the demo shows whether the connectors read it right (the schema's synonyms, count words, units)
QUESTIONS = [
    ("A little girl of four travelled 2nd class with one parent and a sister; her ticket cost £26. "
     "Did the passenger survive the sinking?",
     {"pclass": "second", "sex": "female", "age": 4.0, "sibsp": 1, "parch": 1, "fare": 26.0}),
    ("A man of 40 in 3rd class, no siblings or spouses and no parents or children aboard, fare 7.90 pounds. "
     "Did the passenger survive the sinking?",
     {"pclass": "third", "sex": "male", "age": 40.0, "sibsp": 0, "parch": 0, "fare": 7.9}),
    ("pclass=1, sex=F, age=38, sibsp=1, parch=0, fare=71.28 - did the passenger survive the sinking?",
     {"pclass": "first", "sex": "female", "age": 38.0, "sibsp": 1, "parch": 0, "fare": 71.28}),
]


def read_check(features: dict, said: dict) -> list[str]:
    """'name=value ok' or 'name=value (said X)' per feature: what the encoder read vs what the question says."""
    out = []
    for name, want in said.items():
        got = features.get(name)
        same = got == want if not isinstance(want, float) or got is None else abs(float(got) - want) < 0.01
        out.append(f"{name}={got} " + ("ok" if same else f"(said {want})"))
    return out


def _step(n: int, text: str) -> None:
    print(f"\n[demo {n}/6] {text}", flush=True)


def _submit(settings: Settings, module: str, *args: str) -> None:
    """``ray job submit -- python -m <module> ...`` against the local head; raises if the job fails."""
    print("  $ " + " ".join(["ray job submit --", "python -m", module, *args]), flush=True)
    code = local.submit_job(settings, [sys.executable, "-m", module, *args], cwd=ROOT)
    if code != 0:
        raise local.ClusterError(f"the {module} job failed (exit {code}); see its logs in the dashboard (Jobs)")


def _latest(registry: Registry, kind: str):
    try:
        return registry.resolve(DEMO_TENANT, kind, EXPERT)
    except NotFound:
        return None


def _wait_http(url: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise local.ClusterError(f"the Serve app did not answer at {url} within {timeout_s:.0f} s; see the Serve tab")


def run_demo(settings: Settings, budget_s: float = 600.0, retrain: bool = False) -> None:
    """Run the demo; raises on the first failing step with the reason."""
    import httpx

    _step(1, "starting the local Ray head (atelier up) and resolving the embedded model")
    info = local.up(settings)
    print(f"  dashboard: {info.dashboard_url}  (GCS {info.gcs_address}, auth {info.auth})")
    model = resolve_model(settings.default_model, settings, progress=lambda m: print(f"  {m}", flush=True))
    print(f"  {model.id}: {model.num_layers} layers, hidden {model.hidden_size}, hash {model.content_hash[:16]}…")

    _step(2, f"registering tenant {DEMO_TENANT!r}, issuing an API key, publishing the titanic schema")
    registry = Registry(settings.store_uri)
    try:
        registry.get_tenant(DEMO_TENANT)
    except NotFound:
        registry.create_tenant(DEMO_TENANT, "Demo tenant")
    key = registry.issue_key(DEMO_TENANT, label="make demo")
    print(f"  API key for tenant {DEMO_TENANT!r} (shown once): {key}")
    schema_path = ROOT / "examples" / "schemas" / "titanic.json"

    _step(3, "tenant side: DP expert (ε = 1) on the titanic training split, as a Ray Train job")
    expert = _latest(registry, "expert")
    stale = None if expert is None else stale_reason(expert.metadata, schema_sha256=load_schema(schema_path).sha256())
    if expert is not None and not retrain and stale is None:
        print("  reusing the published expert (`atelier demo --retrain` trains it afresh)")
    elif stale is not None and not retrain:
        print(f"  not reusing the published expert ({stale}): training it afresh")
    if retrain or expert is None or stale is not None:
        _submit(settings, "train_jobs.experts", "--tenant", DEMO_TENANT, "--name", EXPERT, "--schema",
                str(schema_path), "--paper-dataset", "titanic", "--epsilon", "1", "--store", settings.store_uri)
    expert = _latest(registry, "expert")
    print(f"  {expert.ref}: ε spent {expert.metadata.get('epsilon')}")

    _step(4, f"server side: connectors from the schema + expert only (budget {budget_s:.0f} s)")
    conn = _latest(registry, "connectors")
    stale = None if conn is None else stale_reason(conn.metadata, code=source_fingerprint(),
                                                   expert_version=expert.version)
    if stale is not None and not retrain:
        print(f"  not reusing the published connectors ({stale}): training them afresh")
    if retrain or conn is None or stale is not None:
        _submit(settings, "train_jobs.connectors", "--tenant", DEMO_TENANT, "--name", EXPERT, "--model",
                model.id, "--time-budget", str(budget_s), "--threads", "2", "--cpus-per-tenant", "1",
                "--store", settings.store_uri)
        conn = _latest(registry, "connectors")
    else:  # an earlier run's connectors, trained by this code for this expert
        print(f"  reusing {conn.ref} (same llamdex code, same expert); `atelier demo --retrain` trains them afresh")
    print(f"  {conn.ref}: held-out synthetic accuracy {conn.metadata.get('heldout_synthetic', {})}")
    from llamdex.pipeline import OVERRUN_NOTE

    seconds = {k: round(v) for k, v in conn.metadata.get("seconds", {}).items()}
    print(f"  seconds per stage: {seconds}")
    for note in conn.metadata.get("notes", []):
        if note.startswith(OVERRUN_NOTE):
            print(f"  note: {note}")

    _step(5, "deploying the Serve app (atelier serve)")
    code = subprocess.call([str(Path(sys.executable).with_name("atelier")), "serve"], cwd=ROOT,
                           env=local.client_env(settings))
    if code != 0:
        raise local.ClusterError(f"atelier serve failed (exit {code})")
    url = f"http://127.0.0.1:{settings.serve_port}"
    _wait_http(url)

    _step(6, f"asking {DEMO_TENANT}/{EXPERT} over HTTP")
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=300) as client:
        for q, said in QUESTIONS:
            chat = client.post("/v1/chat/completions", json={
                "model": f"{DEMO_TENANT}/{EXPERT}", "messages": [{"role": "user", "content": q}], "max_tokens": 16})
            chat.raise_for_status()
            pred = client.post(f"/v1/experts/{DEMO_TENANT}/{EXPERT}/predict", json={"question": q})
            pred.raise_for_status()
            body = pred.json()
            print(f"  Q: {q}\n  chat answer: {chat.json()['choices'][0]['message']['content']!r}")
            print(f"  predict: {json.dumps({k: body.get(k) for k in ('label', 'probabilities', 'not_stated')})}")
            print("  read:    " + ", ".join(read_check(body["features"], said)))
    print(f"\n  Ray dashboard:  {info.dashboard_url}   (Jobs, Train and Serve tabs)")
    print(f"  OpenAI API:     {url}/v1   (key above; docs at {url}/docs)")
    print(f"  artifact store: {settings.store_uri}")
    print("  stop everything: atelier down")
