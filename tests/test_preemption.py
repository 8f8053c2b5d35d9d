"""SIGTERM handling of a training worker process, without Ray: the flag, the grace timer, the restart cause, stop-node."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from service.cli import main as cli_main
from service.metrics import RunMetrics
from workers import preemption
from workers.faults import _is_raylet_of, find_raylet
from workers.preemption import _parent_pid


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
    arguments = ["/opt/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/raylet", "--node_id=abc"]

    assert _is_raylet_of(arguments, "abc")
    assert not _is_raylet_of(arguments, "abd")
    assert not _is_raylet_of(["/usr/bin/python", "--node_id=abc"], "abc")


def test_find_raylet_of_unknown_node():
    assert find_raylet("0" * 56) is None


def test_parent_pid_read_from_proc():
    assert _parent_pid(os.getpid()) == os.getppid()
    assert _parent_pid(2**22 + 1) is None  # above Linux's pid_max limit, so no such process


def test_stop_node_of_unknown_node_rejected(caplog: pytest.LogCaptureFixture):
    assert cli_main(["stop-node", "--node-id", "0123abcd", "--grace-s", "1"]) == 2
    assert "no raylet of node 0123abcd runs on this machine" in caplog.text
