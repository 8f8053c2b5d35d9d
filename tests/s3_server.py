"""A real S3-compatible server for tests: moto's server mode in a subprocess on 127.0.0.1.

moto keeps every bucket and object in the memory of the server process, so a
stopped and restarted server comes back empty. To make storage unreachable
while the objects survive, put a ``TcpForwarder`` in front of the server and
stop the forwarder instead: clients then get "connection refused", as from a
stopped server.

Run as a script, this file is the forwarder:
``python s3_server.py forward LISTEN_PORT TARGET_PORT``.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this ran (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts(port: int) -> bool:
    """Return True when a TCP connection to 127.0.0.1:``port`` succeeds."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_until_refused(port: int, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:``port`` any more."""
    deadline = time.monotonic() + timeout_s
    while port_accepts(port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"127.0.0.1:{port} still accepts connections after {timeout_s:.0f} s")
        time.sleep(0.05)


class LoopbackProcess:
    """A subprocess serving on 127.0.0.1:``port``, with its output in a log file, stopped by PID."""

    name = "process"

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError(f"the {self.name} is not running; call start() first")
        return self._process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        return port_accepts(self.port)

    def start(self) -> None:
        """Start the process and wait until it serves, at most ``START_TIMEOUT_S`` seconds."""
        if self._process is not None:
            raise RuntimeError(f"the {self.name} on port {self.port} is already running (pid {self._process.pid})")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the {self.name} exited with code {self._process.returncode} while starting on port {self.port}; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"the {self.name} on port {self.port} did not serve within {START_TIMEOUT_S:.0f} s; "
            f"last log lines:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the process by PID: SIGTERM, then SIGKILL if it is still running after ``STOP_TIMEOUT_S``."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-num_lines:])


class MotoServer(LoopbackProcess):
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1."""

    name = "moto server"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def is_ready(self) -> bool:
        # An empty ProxyHandler keeps a proxy from the environment out of loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.endpoint_url}/moto-api/", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def storage_options(self, port: int | None = None, config_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return fsspec storage options for this server (or a forwarder on ``port``), without credentials.

        Credentials come from the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
        environment variables, as they do in a real run. ``config_kwargs`` are
        botocore client settings such as timeouts and retries.
        """
        options: dict[str, Any] = {"endpoint_url": f"http://127.0.0.1:{port or self.port}", "client_kwargs": {"region_name": REGION}}
        if config_kwargs:
            options["config_kwargs"] = config_kwargs
        return options

    def filesystem(self) -> Any:
        """Return a new s3fs client with no cached listings, so its listings include objects written by other processes."""
        import s3fs  # here, so that the forwarder process starts without it

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())

    def restart(self) -> None:
        """Stop the server and start a new one on the same port; the new one has no buckets."""
        self.stop()
        self.start()

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (with a unique name unless ``name`` is given) and return its name."""
        name = name or f"stalwart-test-{uuid.uuid4().hex[:12]}"
        # Not fs.mkdir: s3fs sends the client region as LocationConstraint, and S3
        # rejects a LocationConstraint of us-east-1.
        self.filesystem().call_s3("create_bucket", Bucket=name)
        return name


class TcpForwarder(LoopbackProcess):
    """A forwarder of TCP connections from 127.0.0.1:``port`` to 127.0.0.1:``target_port``."""

    name = "TCP forwarder"

    def __init__(self, log_path: Path, target_port: int, port: int | None = None):
        super().__init__(log_path, port)
        self.target_port = target_port

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "forward", str(self.port), str(self.target_port)]


async def _copy_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _forward_handler(target_port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_copy_stream(client_reader, server_writer), _copy_stream(server_reader, client_writer))

    return handle


async def _serve_forwarder(listen_port: int, target_port: int) -> None:
    server = await asyncio.start_server(_forward_handler(target_port), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "forward":
        sys.exit("usage: python s3_server.py forward LISTEN_PORT TARGET_PORT")
    asyncio.run(_serve_forwarder(int(sys.argv[2]), int(sys.argv[3])))
