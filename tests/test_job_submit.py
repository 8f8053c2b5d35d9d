"""The documented `ray job submit` command against a real Ray head with token authentication.

The test starts a Ray head on 127.0.0.1 (`ray start --head --block`, job server
included) with a token of its own, runs the command block of docs/operations.md
unchanged, and checks that the job succeeds and commits checkpoints to a real
S3-compatible server. As on a real cluster, the storage credentials are in the
environment of the head's processes, and the job's runtime environment, which
Ray shows to anyone who can reach the job API, must not contain them. The config
path contains `;`, parentheses and a space, so a quoting mistake anywhere between
the shell, `ray job submit` and the job's shell fails the job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from prometheus_server import free_port
from service.catalog import list_checkpoints
from service.driver import WORKER_ENV_KEYS

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[1]
OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"
SUBMIT_MARKER = "<!-- test: ray job submit -->"
VENV_BIN = str(Path(sys.executable).parent)
HEAD_START_TIMEOUT_S = 180
SUBMIT_TIMEOUT_S = 600
STOP_TIMEOUT_S = 30
STEPS = 12


def documented_submit_command() -> str:
    """Return the shell block that follows the marker in docs/operations.md."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    match = re.search(re.escape(SUBMIT_MARKER) + r"\s*```bash\n(.*?)```", text, flags=re.DOTALL)
    assert match, f"no ```bash block after {SUBMIT_MARKER!r} in {OPERATIONS_DOC}"
    return match.group(1)


def base_environment() -> dict[str, str]:
    """The test's environment less Ray, W&B and AWS settings, with this virtual environment first on PATH."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_", "AWS_", "WANDB_"))}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RayHead:
    """`ray start --head --block` in a session of its own, stopped by its process group."""

    def __init__(self, folder: Path, token_path: Path, node_environment: dict[str, str]):
        # Unix socket paths under the temp dir must stay short, so not under pytest's tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="stw-ray-", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = folder / "ray-head.log"
        self.env = {**base_environment(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
                    **node_environment}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; see {self.log_path}")
            if self.job_api_ready():
                return
            time.sleep(2)
        raise TimeoutError(f"the Ray job server was not ready within {HEAD_START_TIMEOUT_S} s; see {self.log_path}")

    def job_api_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/version", timeout=5):
                return True
        except urllib.error.HTTPError as error:
            return error.code in (401, 403)  # the server is up and requires the token
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM the `ray start` process (it stops what it started), then SIGKILL its group if needed."""
        if self.process is None:
            return
        group = os.getpgid(self.process.pid) if self.process.poll() is None else self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def token_path(tmp_path_factory) -> Path:
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = tmp_path_factory.mktemp("auth") / "auth_token"
    path.touch(mode=0o600)
    path.write_text(generate_new_authentication_token(), encoding="utf-8")
    return path


# Dummy credentials of the S3-compatible test server (set by conftest's aws_test_environment).
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, token_path, aws_test_environment) -> Iterator[RayHead]:
    node_environment = {name: os.environ[name] for name in CREDENTIAL_VARIABLES}
    head = RayHead(tmp_path_factory.mktemp("ray-head"), token_path, node_environment)
    try:
        head.start()
        yield head
    finally:
        head.stop()


def client_environment(head: RayHead, token_path: Path, storage: dict[str, str] | None = None) -> dict[str, str]:
    """What the docs tell a user to set: the head's address, token auth, and storage settings."""
    return {**base_environment(), "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path), **(storage or {})}


def list_jobs(head: RayHead, token_path: Path) -> list[dict]:
    request = urllib.request.Request(f"{head.address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token_path.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_forwarded_variables_match_driver():
    sys.path.insert(0, str(REPO_ROOT / "deploy" / "ray-job"))
    try:
        from runtime_env import FORWARDED_VARIABLES
    finally:
        sys.path.pop(0)
    assert set(FORWARDED_VARIABLES) == set(WORKER_ENV_KEYS) - {"AWS_PROFILE"}


def test_job_api_rejects_missing_token(ray_head, token_path):
    env = {**client_environment(ray_head, token_path)}
    del env["RAY_AUTH_MODE"]  # without it the client sends no token
    result = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", ray_head.address], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "Authentication required" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def submitted_job(ray_head, token_path, s3_server, tmp_path_factory):
    bucket = s3_server.create_bucket()
    # A folder name the shell would split or run as two commands unless it stays quoted.
    config_dir = tmp_path_factory.mktemp("config") / "job (v1);a"
    config_dir.mkdir()
    config_path = config_dir / "job.yaml"
    config_path.write_text(yaml.safe_dump({
        "run": {"name": "submitted", "seed": 5},
        "storage": {"uri": f"s3://{bucket}/runs", "options": s3_server.storage_options()},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 20},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "log_every": 4},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"every_steps": 6},
        "metrics": {"port": 0},
        "scaling": {"num_workers": 2},
    }), encoding="utf-8")
    # The submitter has credentials too (a user's shell usually has); the command must not pass them on.
    storage = {name: os.environ[name] for name in (*CREDENTIAL_VARIABLES, "AWS_DEFAULT_REGION")}
    env = {**client_environment(ray_head, token_path, storage), "STALWART_CONFIG": str(config_path)}
    started = time.monotonic()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_submit_command()], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, check=False)
    jobs = list_jobs(ray_head, token_path)
    return {"result": result, "jobs": jobs, "bucket": bucket, "elapsed_s": time.monotonic() - started,
            "config_path": config_path}


def test_documented_submit_succeeds(submitted_job):
    result = submitted_job["result"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    jobs = submitted_job["jobs"]
    assert [job["status"] for job in jobs] == ["SUCCEEDED"]


def test_entrypoint_keeps_quoted_path(submitted_job):
    (job,) = submitted_job["jobs"]
    # `ray job submit` re-quotes its arguments; the job's shell must turn them back into the same path.
    assert job["entrypoint"].endswith(f"-c '{submitted_job['config_path']}'")


def test_runtime_env_has_no_credentials(submitted_job):
    (job,) = submitted_job["jobs"]
    env_vars = job["runtime_env"]["env_vars"]
    assert env_vars["AWS_DEFAULT_REGION"] == os.environ["AWS_DEFAULT_REGION"]
    leaked = [name for name in CREDENTIAL_VARIABLES if name in env_vars]
    assert not leaked, f"credentials stored in the job's runtime environment: {leaked}"
    secrets = [os.environ[name] for name in CREDENTIAL_VARIABLES]
    assert not any(secret in json.dumps(job) for secret in secrets)


def test_submitted_job_commits_checkpoints(submitted_job, s3_server):
    run_uri = f"s3://{submitted_job['bucket']}/runs/submitted"
    committed = [info.step for info in list_checkpoints(s3_server.filesystem(), run_uri) if info.usable]
    assert committed == [6, STEPS]
