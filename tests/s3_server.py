"""A real S3-compatible server for tests: moto's server mode in a subprocess on 127.0.0.1.

moto keeps every bucket and object in the memory of the server process, so a
stopped and restarted server comes back empty. ``pause`` freezes the process
with SIGSTOP instead: clients then time out, and the stored objects survive
until ``resume``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import s3fs

REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this ran (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """One ``python -m moto.server`` process bound to 127.0.0.1, started and stopped by PID."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the moto server is not running; call start() first")
        return self._process.pid

    def storage_options(self, **config_kwargs: Any) -> dict[str, Any]:
        """Return fsspec storage options for this server, without credentials.

        Credentials come from the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
        environment variables, as they do in a real run.
        """
        options: dict[str, Any] = {"endpoint_url": self.endpoint_url, "client_kwargs": {"region_name": REGION}}
        if config_kwargs:
            options["config_kwargs"] = config_kwargs
        return options

    def filesystem(self) -> s3fs.S3FileSystem:
        """Return a new s3fs client with no cached listings, so it sees writes made by other processes."""
        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())

    def start(self) -> None:
        """Start the server and wait until it answers HTTP, at most ``START_TIMEOUT_S`` seconds."""
        if self._process is not None:
            raise RuntimeError(f"the moto server on port {self.port} is already running (pid {self._process.pid})")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        # An empty ProxyHandler keeps a proxy from the environment out of loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the moto server exited with code {self._process.returncode} while starting on port {self.port}; "
                    f"last log lines:\n{self.log_tail()}"
                )
            try:
                with opener.open(f"{self.endpoint_url}/moto-api/", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"the moto server on port {self.port} did not answer within {START_TIMEOUT_S:.0f} s; "
            f"last log lines:\n{self.log_tail()}"
        )

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: the kernel still accepts connections, but no request is answered until ``resume``."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a server frozen by ``pause`` or by a SIGSTOP sent from another process."""
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL if it is still running after ``STOP_TIMEOUT_S``."""
        process, self._process = self._process, None
        if process is None:
            return
        # A frozen process keeps SIGTERM pending until it is continued. The
        # SIGSTOP may have come from another process, so continue it in any case.
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop the server and start a new one on the same port; the new one holds no buckets."""
        self.stop()
        self.start()

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (with a unique name unless ``name`` is given) and return its name."""
        name = name or f"stalwart-test-{uuid.uuid4().hex[:12]}"
        # Not fs.mkdir: s3fs sends the client region as LocationConstraint, and S3
        # rejects a LocationConstraint of us-east-1.
        self.filesystem().call_s3("create_bucket", Bucket=name)
        return name

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-num_lines:])
