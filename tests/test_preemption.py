"""SIGTERM handling of a training worker process, without Ray: the flag, the grace timer, the restart cause, stop-node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from service.cli import main as cli_main
from service.metrics import RunMetrics
from workers import preemption
from workers.faults import find_raylet
from workers.preemption import stop_node
from workers.procfs import as_raylet, command_line, is_running, parent_pid, start_time, train_worker_pids


@pytest.fixture
def sigterm_flag(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Install the worker's SIGTERM handler in this process, then restore the previous one and the flag."""
    monkeypatch.setattr(preemption, "_sigterm_received_at", None)
    previous = signal.getsignal(signal.SIGTERM)
    preemption.install_sigterm_handler()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_until(condition, limit_s: float = 5.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_sigterm_sets_flag_and_process_lives(sigterm_flag):
    assert not preemption.sigterm_received()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_until(preemption.sigterm_received)


def test_install_on_main_thread_needs_no_ray(sigterm_flag):
    assert preemption.install_in_worker_process()
    assert signal.getsignal(signal.SIGTERM) is preemption._record_sigterm


def test_watcher_calls_expiry_after_grace(sigterm_flag):
    expired: list[tuple[str, float]] = []
    watcher = preemption.SigtermWatcher("rank=1", 0.5, on_expired=lambda description, grace_s: expired.append((description, grace_s)))
    watcher.start()
    time.sleep(0.7)
    assert expired == [], "the watcher acted before any SIGTERM"
    sent_at = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_until(lambda: bool(expired))
    assert time.monotonic() - sent_at >= 0.5
    assert expired == [("rank=1", 0.5)]


def test_watcher_stop_cancels_expiry(sigterm_flag):
    expired = threading.Event()
    watcher = preemption.SigtermWatcher("rank=0", 0.5, on_expired=lambda description, grace_s: expired.set())
    watcher.start()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_until(preemption.sigterm_received)
    watcher.stop()
    assert not expired.wait(1.0)


def restarts_by_cause(metrics: RunMetrics) -> dict[str, float]:
    return {sample.labels["cause"]: sample.value for sample in metrics.restarts.collect()[0].samples
            if sample.name.endswith("_total")}


def test_restart_after_preemption_counted_as_preempted():
    metrics = RunMetrics("preempted-run")
    metrics.record_attempt(1, 2)
    metrics.record_preemption()
    metrics.record_attempt(2, 2)
    metrics.record_attempt(3, 2)

    assert restarts_by_cause(metrics) == {"failure": 1.0, "hang": 0.0, "preempted": 1.0}


def test_raylet_match_needs_node_id():
    arguments = ["/opt/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/raylet", "--node_id=abc",
                 "--gcs-address=127.0.0.1:6379"]

    raylet = as_raylet(7, arguments)
    assert raylet is not None
    assert (raylet.pid, raylet.node_id, raylet.gcs_address) == (7, "abc", "127.0.0.1:6379")
    assert as_raylet(7, ["/usr/bin/python", "--node_id=abc"]) is None
    assert as_raylet(7, arguments[:2]) is None


def test_find_raylet_of_unknown_node():
    assert find_raylet("0" * 56) is None


def test_parent_pid_read_from_proc():
    assert parent_pid(os.getpid()) == os.getppid()
    assert parent_pid(2**22 + 1) is None  # above Linux's pid_max limit, so no such process
    assert start_time(2**22 + 1) is None


# A fake raylet: a Python process named .../raylet with a raylet's arguments. It starts a process
# titled like a Ray Train worker below a shell, as a runtime_env wrapper may, and prints its pid.
FAKE_RAYLET = (
    "import subprocess, time\n"
    "shell = subprocess.Popen(['bash', '-c', 'exec -a ray::RayTrainWorker sleep 120 & echo $!; wait'],\n"
    "                         stdout=subprocess.PIPE, text=True)\n"
    "print(shell.stdout.readline().strip(), flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def fake_raylet() -> Iterator[tuple[subprocess.Popen, int]]:
    node_id = "fa6e" * 14
    raylet = subprocess.Popen(["bash", "-c", f'exec -a /opt/ray/raylet "{sys.executable}" -c "$0" --node_id={node_id} '
                               "--gcs-address=127.0.0.1:9", FAKE_RAYLET], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(raylet.stdout.readline())
        # The shell prints the pid when it forks, before `exec -a` gives the process its title.
        assert wait_until(lambda: (command_line(worker_pid) or [""])[0] == "ray::RayTrainWorker"), \
            f"the fake worker {worker_pid} never took its title"
        yield raylet, worker_pid
    finally:
        for pid in (raylet.pid, worker_pid if "worker_pid" in locals() else None):
            if pid is not None and is_running(pid):
                os.kill(pid, signal.SIGKILL)
        raylet.wait(timeout=10)


def test_stop_node_signals_workers_below_raylet(fake_raylet, caplog: pytest.LogCaptureFixture):
    raylet, worker_pid = fake_raylet
    assert parent_pid(worker_pid) != raylet.pid, "the fake worker should sit below a shell"
    assert train_worker_pids(raylet.pid) == [worker_pid]

    # No GCS listens at the fake raylet's GCS address: the drain fails or times out, and the worker still gets its SIGTERM.
    assert stop_node("fa6e" * 14, grace_s=5) == []
    assert not is_running(worker_pid), "the worker is still running"
    assert "without the drain" in caplog.text


def test_stop_node_rejects_bad_grace():
    with pytest.raises(ValueError, match="grace_s=0"):
        stop_node(grace_s=0)


@pytest.fixture
def auth_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Unset Ray's authentication variables for the test and restore them after, whatever stop-node sets."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    return monkeypatch


def test_stop_node_of_unknown_node_rejected(auth_environment, caplog: pytest.LogCaptureFixture):
    assert cli_main(["stop-node", "--node-id", "0123abcd", "--grace-s", "1"]) == 2
    assert "no raylet of node 0123abcd runs on this machine" in caplog.text


def test_stop_node_sends_token_when_one_exists(auth_environment, tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("0" * 64)
    auth_environment.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    cli_main(["stop-node", "--node-id", "0123abcd", "--grace-s", "1"])
    assert os.environ["RAY_AUTH_MODE"] == "token"

    # A mode the user chose is kept.
    auth_environment.setenv("RAY_AUTH_MODE", "disabled")
    cli_main(["stop-node", "--node-id", "0123abcd", "--grace-s", "1"])
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


@pytest.mark.parametrize("grace", ["0", "-5", "nan", "inf", "soon"])
def test_stop_node_grace_must_be_positive(grace: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        cli_main(["stop-node", "--grace-s", grace])
    assert "not a positive number of seconds" in capsys.readouterr().err


def test_stop_node_empty_node_id_rejected(caplog: pytest.LogCaptureFixture):
    assert cli_main(["stop-node", "--node-id", "", "--grace-s", "1"]) == 2
    assert "--node-id is empty" in caplog.text
