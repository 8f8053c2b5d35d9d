"""Hang watchdog: kills this rank when no step completes within the hang timeout.

A rank stuck in a collective cannot be interrupted from Python, so the
watchdog ends the process. Ray Train detects the dead worker and restarts the
attempt from the latest committed checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
RECENT_STEPS = 20


class HangWatchdog:
    """Background thread that calls ``on_hang`` when progress stops for longer than the timeout.

    The timeout is ``fixed_timeout_s`` when given, otherwise ``step_multiple``
    times the median of recent step times, never below ``floor_s`` (and exactly
    ``floor_s`` until a step time was observed, which covers start-up).
    """

    def __init__(self, *, fixed_timeout_s: float | None, floor_s: float, step_multiple: float,
                 on_hang: Callable[[float, float], None]):
        self.fixed_timeout_s = fixed_timeout_s
        self.floor_s = floor_s
        self.step_multiple = step_multiple
        self._on_hang = on_hang
        self._step_times: deque[float] = deque(maxlen=RECENT_STEPS)
        self._last_progress = time.monotonic()
        self._paused = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalwart-hang-watchdog", daemon=True)

    def timeout_s(self) -> float:
        if self.fixed_timeout_s is not None:
            return self.fixed_timeout_s
        if not self._step_times:
            return self.floor_s
        return max(self.floor_s, self.step_multiple * statistics.median(self._step_times))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * POLL_INTERVAL_S)

    def step_done(self, step_time_s: float) -> None:
        with self._lock:
            self._step_times.append(step_time_s)
            self._last_progress = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Suspend the watchdog around work that is not a step (checkpoint save or load)."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last_progress = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            with self._lock:
                if self._paused:
                    continue
                stalled_s = time.monotonic() - self._last_progress
                timeout_s = self.timeout_s()
            if stalled_s > timeout_s:
                self._on_hang(stalled_s, timeout_s)
                return


def kill_this_process(reason: str) -> None:
    """Log ``reason`` and end this process with SIGKILL (a hung collective cannot be unwound)."""
    logger.error("%s; killing pid %d so Ray Train restarts the attempt", reason, os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
