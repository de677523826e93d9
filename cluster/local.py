"""A local Ray head for one machine: ``atelier up`` / ``atelier status`` / ``atelier down``.

``up`` runs ``ray start --head --block`` as a child process in its own session and records its
pid; ``down`` signals only that process group, so other Ray instances on the host (a test
cluster, a colleague's head) are never touched — unlike ``ray stop``, which kills them all.

Token auth (Ray 2.60's default for new clusters) stays on unless ``ATELIER_AUTH=disabled``.
Clients on the same machine then need ``RAY_AUTH_MODE=token``; ``up`` writes
``<home>/cluster/env.sh`` with that and ``RAY_ADDRESS`` so ``ray job submit`` works after
``source``-ing it, and ``atelier job`` sets both itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.logs import get_logger
from cluster.settings import Settings

log = get_logger("local")


class ClusterError(RuntimeError):
    """The local head could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class HeadInfo:
    pid: int
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    auth: str
    started_at: float


def ray_temp_dir(settings: Settings) -> str:
    """A short per-home temp dir (Unix socket paths must stay under ~107 characters)."""
    digest = hashlib.sha256(str(settings.home).encode()).hexdigest()[:8]
    return f"/tmp/atelier-ray-{digest}"


def client_env(settings: Settings, base: dict | None = None) -> dict[str, str]:
    """Environment for Ray clients (``ray job submit``, ``serve deploy``) talking to this head."""
    env = dict(os.environ if base is None else base)
    env["RAY_ADDRESS"] = settings.dashboard_url
    env["RAY_AUTH_MODE"] = settings.auth
    return env


def submit_job(settings: Settings, entrypoint: list[str], num_cpus: float = 0.5, working_dir: str | None = None,
               cwd: str | Path | None = None) -> int:
    """``ray job submit [--working-dir D] -- <entrypoint>`` against this head (auth + address set);
    blocks while the job runs, tailing its logs, and returns the CLI's exit code."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", f"--entrypoint-num-cpus={num_cpus}"]
    if working_dir is not None:
        cmd += ["--working-dir", working_dir]
    return subprocess.call([*cmd, "--", *entrypoint], env=client_env(settings), cwd=cwd)


def read_head(settings: Settings) -> HeadInfo | None:
    """The recorded head if its process is still alive, else None (stale records are removed)."""
    state = settings.cluster_dir / "head.json"
    if not state.exists():
        return None
    info = HeadInfo(**json.loads(state.read_text()))
    if not _alive(info.pid):
        state.unlink(missing_ok=True)
        return None
    return info


def up(settings: Settings, timeout_s: float = 90.0) -> HeadInfo:
    """Start the local head (idempotent) and wait until its dashboard answers."""
    existing = read_head(settings)
    if existing:
        log.info("cluster.already_running", pid=existing.pid, dashboard=existing.dashboard_url)
        return existing
    ray_bin = _ray_bin()
    settings.cluster_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = ray_temp_dir(settings)
    cmd = [ray_bin, "start", "--head", "--block", f"--port={settings.ray_port}",
           f"--dashboard-host={settings.dashboard_host}", f"--dashboard-port={settings.dashboard_port}",
           f"--dashboard-agent-listen-port={settings.agent_port}", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           f"--object-store-memory={settings.object_store_mb * 1024 * 1024}"]
    if settings.num_cpus:
        cmd.append(f"--num-cpus={settings.num_cpus}")
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = settings.auth
    # Job drivers inherit the head's PATH: put this environment's python first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if settings.auth == "token" and auth_token() is None:
        # Ray only creates the token itself in ray.init(); `ray start` needs one to exist.
        subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
        log.info("cluster.token_generated", path=os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
    logfile = open(settings.cluster_dir / "head.log", "ab")
    log.info("cluster.starting", cmd=" ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = HeadInfo(pid=proc.pid, gcs_address=f"127.0.0.1:{settings.ray_port}",
                    dashboard_url=settings.dashboard_url, temp_dir=temp_dir, auth=settings.auth,
                    started_at=time.time())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (settings.cluster_dir / "head.log").read_text(errors="replace")[-1500:]
            raise ClusterError(f"ray start exited with code {proc.returncode}; last log lines:\n{tail}\n"
                               "fix: if the ports are taken by another Ray, set ATELIER_RAY_PORT / "
                               "ATELIER_DASHBOARD_PORT")
        if dashboard_ready(settings) and _agent_ready(settings):
            break
        time.sleep(0.5)
    else:
        _terminate(proc.pid, grace_s=10)
        raise ClusterError(f"dashboard at {settings.dashboard_url} did not answer within {timeout_s:.0f} s; "
                           f"see {settings.cluster_dir / 'head.log'}")
    (settings.cluster_dir / "head.json").write_text(json.dumps(asdict(info), indent=2))
    (settings.cluster_dir / "env.sh").write_text(
        f"export RAY_ADDRESS={settings.dashboard_url}\nexport RAY_AUTH_MODE={settings.auth}\n")
    log.info("cluster.up", pid=info.pid, dashboard=info.dashboard_url, gcs=info.gcs_address, auth=info.auth)
    return info


def down(settings: Settings, grace_s: float = 15.0) -> bool:
    """Stop the head started by :func:`up`. Returns False if none was running."""
    info = read_head(settings)
    if info is None:
        return False
    _terminate(info.pid, grace_s=grace_s)
    (settings.cluster_dir / "head.json").unlink(missing_ok=True)
    log.info("cluster.down", pid=info.pid)
    return True


def status(settings: Settings) -> dict:
    """Whether the head runs, where, and (if reachable) its resources as ``ray status`` prints them."""
    info = read_head(settings)
    if info is None:
        return {"running": False}
    out = {"running": True, **asdict(info), "dashboard_ready": dashboard_ready(settings)}
    ray_bin = _ray_bin()
    proc = subprocess.run([ray_bin, "status", f"--address={info.gcs_address}"], capture_output=True,
                          text=True, env=client_env(settings), timeout=60)
    out["ray_status"] = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()[-800:]
    return out


def auth_token() -> str | None:
    """The token Ray clients present, from the same places Ray looks."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return path.read_text().strip() if path.exists() else None


def dashboard_ready(settings: Settings) -> bool:
    """True once the dashboard's job API answers (with the auth token when auth is on)."""
    req = urllib.request.Request(f"{settings.dashboard_url}/api/version")
    token = auth_token() if settings.auth == "token" else None
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _agent_ready(settings: Settings) -> bool:
    """The head's dashboard agent serves HTTP; it registers itself for job submission just before."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.agent_port}/api/healthz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ray_bin() -> str:
    """The ``ray`` CLI of this Python environment (not whatever is first on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _terminate(pid: int, grace_s: float) -> None:
    """SIGTERM the process group (``ray start --block`` drains and stops its daemons), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.3)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
