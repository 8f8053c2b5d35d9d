"""Training stability: spike detectors, their policies, data-window skips and dynamic loss scaling.

Every decision is made from values that are already global (the loss and the
gradient norm are reduced across ranks), and the detector state evolves the
same way on every rank, so all ranks take the same action without another
collective.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

Policy = Literal["log", "skip", "rollback"]
# Robust z-scores use sigma = 1.4826 x MAD, which equals the standard deviation for normal data.
MAD_TO_SIGMA = 1.4826
# A sigma floor relative to the median, so a flat series (MAD near 0) does not turn noise into spikes.
RELATIVE_SIGMA_FLOOR = 0.01


@dataclass(frozen=True)
class StabilityEvent:
    detector: str  # nonfinite, loss_zscore, grad_norm_ratio, loss_ratio, overflow
    action: str  # log, skip, rollback
    step: int
    value: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SpikeAbort(RuntimeError):
    """Too many stability events in too few steps: continuing would waste compute."""


@dataclass(frozen=True)
class DetectorSettings:
    name: str
    metric: Literal["loss", "grad_norm"]
    kind: Literal["zscore", "ratio", "median_ratio"]
    threshold: float
    policy: Policy


class RollingWindow:
    """The last ``size`` accepted values of one metric."""

    def __init__(self, size: int, values: list[float] | None = None):
        self.size = size
        self.values: deque[float] = deque(values or [], maxlen=size)

    @property
    def full(self) -> bool:
        return len(self.values) == self.size

    def zscore(self, value: float) -> float:
        """Return the robust z-score of ``value`` against the window's median and MAD."""
        median = statistics.median(self.values)
        mad = statistics.median(abs(item - median) for item in self.values)
        sigma = max(MAD_TO_SIGMA * mad, RELATIVE_SIGMA_FLOOR * abs(median), 1e-12)
        return (value - median) / sigma

    def ratio(self, value: float) -> float:
        """Return ``value`` over the window's mean."""
        mean = statistics.fmean(self.values)
        return value / mean if mean > 0 else math.inf

    def median_ratio(self, value: float) -> float:
        """Return ``value`` over the window's median."""
        median = statistics.median(self.values)
        return value / median if median > 0 else math.inf


@dataclass
class Decision:
    action: Literal["step", "skip", "rollback"]
    events: list[StabilityEvent] = field(default_factory=list)


ACTION_RANK = {"log": 0, "skip": 1, "rollback": 2}


class SpikeMonitor:
    """Runs the detectors on each step's global loss and grad norm and picks the strongest action.

    No spike decision is made until the window is full, so warmup does not
    raise false alarms. Values of steps that were flagged are not added to
    the window, so a spike does not widen the band it is judged by.
    """

    def __init__(self, detectors: list[DetectorSettings], *, window: int, nonfinite_policy: Policy,
                 max_events: int | None, event_window_steps: int):
        self.detectors = detectors
        self.window_size = window
        self.nonfinite_policy = nonfinite_policy
        self.max_events = max_events
        self.event_window_steps = event_window_steps
        self.windows = {"loss": RollingWindow(window), "grad_norm": RollingWindow(window)}
        self.recent_events: deque[StabilityEvent] = deque()

    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": {name: list(window.values) for name, window in self.windows.items()},
            "recent_events": [event.to_dict() for event in self.recent_events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, values in state.get("windows", {}).items():
            self.windows[name] = RollingWindow(self.window_size, [float(value) for value in values])
        self.recent_events = deque(StabilityEvent(**event) for event in state.get("recent_events", []))

    def _score(self, detector: DetectorSettings, value: float) -> float:
        window = self.windows[detector.metric]
        if detector.kind == "zscore":
            return window.zscore(value)
        if detector.kind == "median_ratio":
            return window.median_ratio(value)
        return window.ratio(value)

    def check(self, step: int, loss: float, grad_norm: float) -> Decision:
        """Return the action for this step; raise ``SpikeAbort`` past the event budget."""
        values = {"loss": loss, "grad_norm": grad_norm}
        events: list[StabilityEvent] = []
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bad = loss if not math.isfinite(loss) else grad_norm
            events.append(StabilityEvent("nonfinite", self.nonfinite_policy, step, bad, math.inf))
        else:
            for detector in self.detectors:
                if not self.windows[detector.metric].full:
                    continue
                score = self._score(detector, values[detector.metric])
                if score > detector.threshold:
                    events.append(StabilityEvent(detector.name, detector.policy, step, values[detector.metric], detector.threshold))

        if not events:
            for name, window in self.windows.items():
                window.values.append(values[name])
            return Decision("step")

        self._count(events)
        strongest = max(events, key=lambda event: ACTION_RANK[event.action]).action
        return Decision({"log": "step", "skip": "skip", "rollback": "rollback"}[strongest], events)

    def _count(self, events: list[StabilityEvent]) -> None:
        step = events[0].step
        self.recent_events.extend(events)
        while self.recent_events and self.recent_events[0].step <= step - self.event_window_steps:
            self.recent_events.popleft()
        if self.max_events is not None and len(self.recent_events) > self.max_events:
            seen = "; ".join(
                f"step {event.step}: {event.detector} value={event.value:.4g} threshold={event.threshold:.4g} action={event.action}"
                for event in self.recent_events
            )
            raise SpikeAbort(
                f"{len(self.recent_events)} stability events within {self.event_window_steps} steps exceed "
                f"stability.max_events={self.max_events}: {seen}. Lower optim.lr, check the data around these "
                "steps, or raise stability.max_events"
            )


class DataSkips:
    """Ranges of global batches that a rollback skipped, in batch-id space.

    Without skips, step ``s`` trains on batch ``s``. A range ``(start, length)``
    means batches ``start .. start + length - 1`` are never trained on: every
    step that would reach them moves past them.
    """

    def __init__(self, ranges: list[tuple[int, int]] | None = None):
        self.ranges: list[tuple[int, int]] = sorted((int(start), int(length)) for start, length in ranges or [])

    def batch_for_step(self, step: int) -> int:
        batch = step
        for start, length in self.ranges:
            if batch >= start:
                batch += length
        return batch

    def add(self, start: int, length: int) -> None:
        self.ranges = sorted(set(self.ranges) | {(start, length)})

    def to_list(self) -> list[list[int]]:
        return [[start, length] for start, length in self.ranges]


class DynamicLossScaler:
    """Dynamic loss scaling for float16 training.

    The overflow test is the global gradient norm being non-finite. That norm
    is reduced across all shards and ranks, so every rank skips the same steps
    and keeps the same scale, which is what a sharded grad scaler must
    guarantee. (torch.amp.GradScaler checks only local gradients.)
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
