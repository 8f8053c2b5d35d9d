"""A real Prometheus server on 127.0.0.1 for tests, and a runner for promtool.

Both binaries come from Debian's `prometheus` package, which `.ci/run` installs.
The server keeps its data in a folder of the test and is stopped by its PID.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD_PATH = REPO_ROOT / "dashboards" / "stalwart.json"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 20


def require_binary(name: str) -> str:
    """Return the path of ``name`` or skip the test when the prometheus package is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found; install Debian's prometheus package (.ci/run does: apt-get install prometheus)")
    return path


def run_promtool(*args: str, stdin: str | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrometheusServer:
    """Prometheus scraping ``targets`` every second, with the project's alert rules loaded."""

    def __init__(self, folder: Path, targets: list[str]):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROMETHEUS_DIR / "alerts.yaml")],
            "scrape_configs": [{"job_name": "stalwart", "static_configs": [{"targets": targets}]}],
        }
        self.config_path = folder / "prometheus.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = folder / "prometheus.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [require_binary("prometheus"), f"--config.file={self.config_path}",
                 f"--web.listen-address=127.0.0.1:{self.port}", f"--storage.tsdb.path={self.folder / 'data'}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {START_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET an HTTP API path and return the parsed body, also of a 4xx response (it contains the error)."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("/api/v1/query", **params)

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> dict[str, Any]:
        return self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s}")

    def wait_for(self, expr: str, timeout_s: float = 30) -> list[dict[str, Any]]:
        """Wait until ``expr`` returns at least one series; return the result."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result.get("status") == "success" and result["data"]["result"]:
                return result["data"]["result"]
            time.sleep(1)
        raise TimeoutError(f"no result for {expr!r} within {timeout_s} s")


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (panel title, expr) for every query target of every panel, rows included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def substitute_variables(expr: str, run: str, range_s: int, rate_interval_s: int) -> str:
    """Replace Grafana's variables the way Grafana does before it sends a query to Prometheus."""
    return (expr.replace("$__rate_interval", f"{rate_interval_s}s").replace("$__range", f"{range_s}s")
            .replace("$__interval", "15s").replace("$run", run))
