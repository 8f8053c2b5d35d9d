"""Goodput accounting and the hang watchdog, without Ray."""

from __future__ import annotations

import time

import pytest

from service.goodput import GoodputTracker
from workers.watchdog import HangWatchdog


def test_goodput_splits_restart_and_recompute():
    tracker = GoodputTracker(started_at=100.0)
    # Attempt 1 starts its first step at 110 (10 s start-up) and runs steps 1-3 of 1 s each.
    for step, end in ((1, 111.0), (2, 112.0), (3, 113.0)):
        tracker.add_step(attempt=1, step=step, end_time=end, duration_s=1.0)
    tracker.add_checkpoint(0.5)
    # It dies; attempt 2 resumes from step 1's checkpoint at 120 and reruns steps 2-3, then step 4.
    for step, end in ((2, 121.0), (3, 122.0), (4, 123.0)):
        tracker.add_step(attempt=2, step=step, end_time=end, duration_s=1.0)
    parts = tracker.parts(now=125.0)
    assert parts["startup"] == 10.0
    assert parts["productive"] == 4.0
    assert parts["recomputed"] == 2.0
    assert parts["recovery"] == 120.0 - 113.0
    assert parts["checkpoint"] == 0.5
    assert parts["total"] == 25.0
    assert parts["other"] == pytest.approx(25.0 - 10.0 - 4.0 - 2.0 - 7.0 - 0.5)
    assert tracker.goodput(now=125.0) == pytest.approx(4.0 / 25.0)


def test_goodput_known_steps_count_as_recomputed():
    tracker = GoodputTracker(started_at=0.0)
    tracker.mark_known_steps({1, 2})
    tracker.add_step(attempt=5, step=2, end_time=2.0, duration_s=1.0)
    tracker.add_step(attempt=5, step=3, end_time=3.0, duration_s=1.0)
    parts = tracker.parts(now=3.0)
    assert parts["recomputed"] == 1.0
    assert parts["productive"] == 1.0


def _watchdog(fired: list, **settings) -> HangWatchdog:
    def on_hang(stalled_s: float, timeout_s: float) -> None:
        fired.append((stalled_s, timeout_s))

    return HangWatchdog(on_hang=on_hang, **settings)


def _wait_for(condition, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_watchdog_fires_when_steps_stop():
    fired: list = []
    watchdog = _watchdog(fired, fixed_timeout_s=1.5, floor_s=100.0, step_multiple=10.0)
    watchdog.start()
    try:
        assert _wait_for(lambda: bool(fired), limit_s=10.0), "the watchdog did not fire within 10 s"
    finally:
        watchdog.stop()
    stalled_s, timeout_s = fired[0]
    assert timeout_s == 1.5
    assert stalled_s > 1.5


def test_watchdog_quiet_while_paused():
    fired: list = []
    watchdog = _watchdog(fired, fixed_timeout_s=1.0, floor_s=100.0, step_multiple=10.0)
    watchdog.start()
    try:
        with watchdog.paused():
            time.sleep(3.0)
        watchdog.step_done(0.1)
        assert not fired
    finally:
        watchdog.stop()


def test_watchdog_derived_timeout():
    watchdog = _watchdog([], fixed_timeout_s=None, floor_s=5.0, step_multiple=10.0)
    assert watchdog.timeout_s() == 5.0  # no step observed yet: the floor
    for _ in range(5):
        watchdog.step_done(2.0)
    assert watchdog.timeout_s() == 20.0
    for _ in range(20):
        watchdog.step_done(0.01)
    assert watchdog.timeout_s() == 5.0
