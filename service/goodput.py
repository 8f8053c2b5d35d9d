"""Goodput accounting: how the wall time of a driver session splits into productive and lost time.

Parts, all in seconds since the driver started:

- productive: first executions of optimizer steps;
- recomputed: re-executions of steps that had already run once (after a
  restart from an older checkpoint, or after a rollback);
- recovery: from the last step of a failed attempt to the first step of the next;
- checkpoint: time the step loop was blocked saving checkpoints;
- startup: from the driver's start to the first step of its first attempt;
- other: the rest (logging, data preparation inside steps' gaps, the end of the run).

goodput = productive / total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PARTS = ("productive", "recomputed", "recovery", "checkpoint", "startup", "other")


@dataclass
class GoodputTracker:
    started_at: float  # wall-clock time the driver session started
    productive_s: float = 0.0
    recomputed_s: float = 0.0
    recovery_s: float = 0.0
    checkpoint_s: float = 0.0
    startup_s: float = 0.0
    _steps_seen: set[int] = field(default_factory=set)
    _last_attempt: int | None = None
    _last_step_end: float | None = None

    def add_step(self, *, attempt: int, step: int, end_time: float, duration_s: float) -> None:
        """Account one executed step; call in execution order."""
        start_time = end_time - duration_s
        if self._last_attempt is None:
            self.startup_s += max(0.0, start_time - self.started_at)
        elif attempt != self._last_attempt and self._last_step_end is not None:
            self.recovery_s += max(0.0, start_time - self._last_step_end)
        if step in self._steps_seen:
            self.recomputed_s += duration_s
        else:
            self.productive_s += duration_s
            self._steps_seen.add(step)
        self._last_attempt = attempt
        self._last_step_end = end_time

    def mark_known_steps(self, steps: set[int]) -> None:
        """Declare steps that earlier driver sessions already ran, so re-running them counts as recomputed."""
        self._steps_seen |= steps

    def add_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s += seconds

    def parts(self, now: float) -> dict[str, float]:
        total = max(now - self.started_at, 1e-9)
        parts = {
            "productive": self.productive_s,
            "recomputed": self.recomputed_s,
            "recovery": self.recovery_s,
            "checkpoint": self.checkpoint_s,
            "startup": self.startup_s,
        }
        parts["other"] = max(0.0, total - sum(parts.values()))
        parts["total"] = total
        return parts

    def goodput(self, now: float) -> float:
        parts = self.parts(now)
        return parts["productive"] / parts["total"]
