"""`atelier up` / `ray job submit` / `atelier status` / `atelier down` for real, with token auth.

Runs with its own HOME (so ~/.ray/auth_token is the test's) and its own ports. A second,
unrelated Ray head runs alongside to prove `atelier down` stops only what `atelier up` started.
"""

import os
import signal
import subprocess
import time

import pytest

from tests.conftest import VENV_BIN

pytestmark = pytest.mark.ray


def _env(home, **extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    env.update(HOME=str(home), ATELIER_HOME=str(home / "atelier"), ATELIER_RAY_PORT="6491",
               ATELIER_DASHBOARD_PORT="8365", ATELIER_AGENT_PORT="52475", ATELIER_NUM_CPUS="2", ATELIER_OBJECT_STORE_MB="200", **extra)
    return env


def _run(cmd, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _env_sh(home) -> dict:
    pairs = (home / "atelier" / "cluster" / "env.sh").read_text().split()
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def test_up_submit_status_down(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    other_tmp = f"/tmp/other-ray-{os.getpid()}"
    other = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port=6492", "--dashboard-port=8366",
         "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={other_tmp}", "--disable-usage-stats"],
        env={**_env(tmp_path / "other-home"), "RAY_AUTH_MODE": "disabled"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        up = _run([str(VENV_BIN / "atelier"), "up"], env)
        assert up.returncode == 0, up.stderr
        assert "dashboard: http://127.0.0.1:8365" in up.stdout
        assert (home / ".ray" / "auth_token").exists()
        again = _run([str(VENV_BIN / "atelier"), "up"], env)
        assert "cluster.already_running" in again.stderr

        # Without RAY_AUTH_MODE=token the job client is refused (token auth is really on) ...
        job_cmd = [str(VENV_BIN / "ray"), "job", "submit", "--entrypoint-num-cpus=0.1", "--",
                   "python", "-c", "import ray; ray.init(); print('CPUS', ray.cluster_resources()['CPU'])"]
        refused = _run(job_cmd, {**env, "RAY_ADDRESS": "http://127.0.0.1:8365"})
        assert refused.returncode != 0
        # ... and with the variables from env.sh it succeeds.
        job = _run(job_cmd, {**env, **_env_sh(home)})
        assert job.returncode == 0, job.stdout + job.stderr
        assert "CPUS 2.0" in job.stdout

        # A relative --schema is read where the user typed it: `--working-dir .` ships that directory
        # and the job's driver resolves the path there (train_jobs.experts.resolve_paths, as main does);
        # without it the driver runs elsewhere and the job fails naming the flag and the fix.
        user = tmp_path / "user"
        (user / "schemas").mkdir(parents=True)
        (user / "schemas" / "mine.json").write_text('{"marker": "typed here"}')
        probe = ["python", "-c", "from train_jobs.experts import ExpertJob, resolve_paths; from pathlib import Path; "
                 "j = resolve_paths(ExpertJob(tenant='a1', name='x', schema_path='schemas/mine.json', "
                 "paper_dataset='titanic')); print('READ', Path(j.schema_path).read_text())"]
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--entrypoint-num-cpus=0.1"]
        shipped = subprocess.run([*submit, "--working-dir", ".", "--", *probe], cwd=user, env={**env, **_env_sh(home)},
                                 capture_output=True, text=True, timeout=180)
        assert shipped.returncode == 0 and 'READ {"marker": "typed here"}' in shipped.stdout, shipped.stdout[-2000:]
        unshipped = subprocess.run([*submit, "--", *probe], cwd=user, env={**env, **_env_sh(home)},
                                   capture_output=True, text=True, timeout=180)
        assert unshipped.returncode != 0 and "fix: pass an existing path with --schema" in unshipped.stdout + unshipped.stderr

        status = _run([str(VENV_BIN / "atelier"), "status"], env)
        assert status.returncode == 0 and '"dashboard_ready": true' in status.stdout

        down = _run([str(VENV_BIN / "atelier"), "down"], env)
        assert down.returncode == 0 and "stopped" in down.stdout
        assert _run([str(VENV_BIN / "atelier"), "status"], env).returncode == 1
        time.sleep(1)
        assert other.poll() is None, "atelier down must not stop an unrelated Ray head"
    finally:
        _run([str(VENV_BIN / "atelier"), "down"], env)
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGTERM)
            try:
                other.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(other.pid, signal.SIGKILL)
