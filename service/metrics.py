"""Prometheus metrics of a run, served by a Ray actor on the driver's node.

The actor outlives worker-group restarts, so counters such as restarts keep
counting across attempts. Workers send it one update per logging interval.
It also carries the driver's stop request (set on SIGTERM) to the workers.
Names follow Prometheus conventions: snake_case, unit suffixes, and counters
declared without ``_total`` because prometheus-client appends it once.
Labels are bounded: ``run`` only, never a step or a path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.goodput import PARTS, GoodputTracker
from service.tracking import open_tracker

logger = logging.getLogger(__name__)

METRIC_PREFIX = "stalwart"
STEP = f"{METRIC_PREFIX}_step"
LOSS = f"{METRIC_PREFIX}_loss"
LEARNING_RATE = f"{METRIC_PREFIX}_learning_rate"
GRAD_NORM = f"{METRIC_PREFIX}_grad_norm"
TOKENS_PER_SECOND = f"{METRIC_PREFIX}_tokens_per_second"
TOKENS = f"{METRIC_PREFIX}_tokens"  # counter: exposed as stalwart_tokens_total
SKIPPED_STEPS = f"{METRIC_PREFIX}_skipped_steps"  # counter
RESTARTS = f"{METRIC_PREFIX}_restarts"  # counter
CHECKPOINT_SAVE_SECONDS = f"{METRIC_PREFIX}_checkpoint_save_seconds"  # histogram
CHECKPOINT_STALL_SECONDS = f"{METRIC_PREFIX}_checkpoint_stall_seconds"  # histogram
CHECKPOINT_SIZE_BYTES = f"{METRIC_PREFIX}_checkpoint_size_bytes"  # gauge: the newest committed checkpoint
CHECKPOINT_WRITTEN_BYTES = f"{METRIC_PREFIX}_checkpoint_written_bytes"  # counter
CHECKPOINT_FAILURES = f"{METRIC_PREFIX}_checkpoint_failures"  # counter
CHECKPOINT_SKIPPED = f"{METRIC_PREFIX}_checkpoint_skipped"  # counter
CHECKPOINT_LOAD_SECONDS = f"{METRIC_PREFIX}_checkpoint_load_seconds"  # histogram
CHECKPOINT_LOADED_BYTES = f"{METRIC_PREFIX}_checkpoint_loaded_bytes"  # counter
LAST_COMMITTED_STEP = f"{METRIC_PREFIX}_last_committed_step"
WORLD_SIZE = f"{METRIC_PREFIX}_world_size"
STABILITY_EVENTS = f"{METRIC_PREFIX}_stability_events"  # counter, labels detector and action
HANGS = f"{METRIC_PREFIX}_hangs"  # counter
RANK_BUSY_SECONDS = f"{METRIC_PREFIX}_rank_busy_seconds"  # gauge, label rank
STRAGGLER = f"{METRIC_PREFIX}_straggler"  # gauge 0/1, label rank
GOODPUT_RATIO = f"{METRIC_PREFIX}_goodput_ratio"
MFU_RATIO = f"{METRIC_PREFIX}_mfu_ratio"  # gauge, absent while no peak FLOP/s is known
START_TIME_SECONDS = f"{METRIC_PREFIX}_start_time_seconds"  # gauge: Unix time
LAST_CHECKPOINT_TIMESTAMP_SECONDS = f"{METRIC_PREFIX}_last_checkpoint_timestamp_seconds"  # gauge: Unix time
WALL_SECONDS = f"{METRIC_PREFIX}_wall_seconds"  # gauge, label part
RESTART_CAUSES = ("failure", "hang", "preempted")
# Every value workers.stability.StabilityEvent takes, so each series exists (at 0) before its first event.
STABILITY_DETECTORS = ("nonfinite", "loss_zscore", "grad_norm_ratio", "loss_ratio", "overflow")
STABILITY_ACTIONS = ("log", "skip", "rollback")

STALL_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SAVE_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RunMetrics:
    """The run's metric families in their own registry (so tests can build several)."""

    def __init__(self, run_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.run_name = run_name
        labels = ["run"]
        self.step = Gauge(STEP, "Last completed optimizer step.", labels, registry=self.registry)
        self.loss = Gauge(LOSS, "Mean token loss of the last logged step.", labels, registry=self.registry)
        self.learning_rate = Gauge(LEARNING_RATE, "Learning rate of the last logged step.", labels, registry=self.registry)
        self.grad_norm = Gauge(GRAD_NORM, "Global gradient L2 norm before clipping, last logged step.", labels, registry=self.registry)
        self.tokens_per_second = Gauge(TOKENS_PER_SECOND, "Training throughput over the last logging interval.", labels, registry=self.registry)
        self.tokens = Counter(TOKENS, "Tokens trained on, counted once per completed step.", labels, registry=self.registry)
        self.skipped_steps = Counter(SKIPPED_STEPS, "Optimizer steps not applied: skipped for a spike or non-finite value, rolled back, or float16 overflow.", labels, registry=self.registry)
        self.restarts = Counter(
            RESTARTS, "Worker-group restarts by cause: hang (the watchdog fired), preempted (SIGTERM to a worker) "
            "or failure (any other).",
            ["run", "cause"], registry=self.registry,
        )
        self.hangs = Counter(HANGS, "Hangs detected by the watchdog.", labels, registry=self.registry)
        self.rank_busy_seconds = Gauge(
            RANK_BUSY_SECONDS, "Mean busy time per step of each rank over the last logging interval "
            "(step time less the wait in the step's first collective).", ["run", "rank"], registry=self.registry,
        )
        self.straggler = Gauge(STRAGGLER, "1 while a rank is flagged as a straggler.", ["run", "rank"], registry=self.registry)
        self.goodput_ratio = Gauge(GOODPUT_RATIO, "Productive step time over wall time of this driver session.", labels,
                                   registry=self.registry)
        self.mfu_ratio = Gauge(
            MFU_RATIO, "Model FLOPs utilization over the last logging interval: model FLOP/s achieved over the peak "
            "FLOP/s of all devices (metrics.peak_flops_per_device). Absent when no peak is known.", labels,
            registry=self.registry,
        )
        self.wall_seconds = Gauge(
            WALL_SECONDS, "Wall time of this driver session by part: productive, recomputed, recovery, checkpoint, "
            "startup, other.", ["run", "part"], registry=self.registry,
        )
        self.checkpoint_save_seconds = Histogram(
            CHECKPOINT_SAVE_SECONDS, "Wall time of a checkpoint save, commit included.", labels,
            buckets=SAVE_SECONDS_BUCKETS, registry=self.registry,
        )
        self.last_committed_step = Gauge(LAST_COMMITTED_STEP, "Step of the newest committed checkpoint.", labels, registry=self.registry)
        self.checkpoint_stall_seconds = Histogram(
            CHECKPOINT_STALL_SECONDS, "Time the step loop was blocked by one checkpoint save (staging, waits and polls).",
            labels, buckets=STALL_SECONDS_BUCKETS, registry=self.registry,
        )
        self.checkpoint_size_bytes = Gauge(CHECKPOINT_SIZE_BYTES, "Bytes of the newest committed checkpoint, all ranks.", labels,
                                           registry=self.registry)
        self.checkpoint_written_bytes = Counter(CHECKPOINT_WRITTEN_BYTES, "Bytes of committed checkpoints written.", labels,
                                                registry=self.registry)
        self.checkpoint_failures = Counter(CHECKPOINT_FAILURES, "Checkpoint saves that did not commit (each is retried).",
                                           labels, registry=self.registry)
        self.checkpoint_skipped = Counter(CHECKPOINT_SKIPPED, "Saves dropped because another save was in flight "
                                          "(checkpoint.overlap_policy=skip).", labels, registry=self.registry)
        self.world_size = Gauge(WORLD_SIZE, "Ranks in the current attempt.", labels, registry=self.registry)
        self.checkpoint_load_seconds = Histogram(
            CHECKPOINT_LOAD_SECONDS, "Wall time of a checkpoint load (resume or rollback), verification included.",
            labels, buckets=SAVE_SECONDS_BUCKETS, registry=self.registry,
        )
        self.checkpoint_loaded_bytes = Counter(CHECKPOINT_LOADED_BYTES, "Bytes of the checkpoints loaded, all ranks.",
                                               labels, registry=self.registry)
        self.stability_events = Counter(
            STABILITY_EVENTS, "Stability detections by detector (nonfinite, loss_zscore, grad_norm_ratio, loss_ratio, "
            "overflow) and the action taken (log, skip, rollback).", ["run", "detector", "action"], registry=self.registry,
        )
        # Create every labelled series now, so counters read 0 instead of being absent.
        for family in (self.step, self.loss, self.learning_rate, self.grad_norm, self.tokens_per_second, self.tokens,
                       self.skipped_steps, self.checkpoint_save_seconds, self.last_committed_step,
                       self.checkpoint_stall_seconds, self.checkpoint_size_bytes, self.checkpoint_written_bytes,
                       self.checkpoint_failures, self.checkpoint_skipped,
                       self.world_size, self.hangs, self.goodput_ratio, self.checkpoint_load_seconds,
                       self.checkpoint_loaded_bytes):
            family.labels(run_name)
        for cause in RESTART_CAUSES:
            self.restarts.labels(run_name, cause)
        for part in PARTS:
            self.wall_seconds.labels(run_name, part)
        for detector in STABILITY_DETECTORS:
            for action in STABILITY_ACTIONS:
                self.stability_events.labels(run_name, detector, action)
        self.restart_count = 0
        self.goodput = GoodputTracker(started_at=time.time())
        # Alert rules measure "too long since" from these two; the second is absent until a commit.
        self.start_time_seconds = Gauge(START_TIME_SECONDS, "Unix time this driver session started.", labels,
                                        registry=self.registry)
        self.start_time_seconds.labels(run_name).set(self.goodput.started_at)
        self.last_checkpoint_timestamp_seconds = Gauge(
            LAST_CHECKPOINT_TIMESTAMP_SECONDS, "Unix time the newest checkpoint of this driver session committed.",
            labels, registry=self.registry,
        )
        self._hang_since_last_attempt = False
        self._preempted_since_last_attempt = False
        self._stop_requested = False
        self._attempts_seen: set[int] = set()
        self.mfu_values: list[float] = []
        self.current_world_size = 0

    def record_attempt(self, attempt: int, world_size: int) -> None:
        """Count a restart for every new attempt after the first one this driver saw."""
        if self._attempts_seen and attempt not in self._attempts_seen:
            self.restarts.labels(self.run_name, self._restart_cause()).inc()
            self.restart_count += 1
        self._hang_since_last_attempt = False
        self._preempted_since_last_attempt = False
        self._attempts_seen.add(attempt)
        self.world_size.labels(self.run_name).set(world_size)
        self.current_world_size = world_size

    def _restart_cause(self) -> str:
        if self._hang_since_last_attempt:
            return "hang"
        if self._preempted_since_last_attempt:
            return "preempted"
        return "failure"

    def record_progress(self, update: dict[str, Any]) -> None:
        run = self.run_name
        self.step.labels(run).set(update["step"])
        self.loss.labels(run).set(update["loss"])
        self.learning_rate.labels(run).set(update["lr"])
        self.grad_norm.labels(run).set(update["grad_norm"])
        self.tokens_per_second.labels(run).set(update["tokens_per_second"])
        self.tokens.labels(run).inc(update["tokens"])
        if update.get("mfu") is not None:
            self.mfu_ratio.labels(run).set(update["mfu"])
            self.mfu_values.append(update["mfu"])
        if update.get("skipped_steps"):
            self.skipped_steps.labels(run).inc(update["skipped_steps"])
        for event in update.get("events", []):
            self.stability_events.labels(run, event["detector"], event["action"]).inc()
        for attempt, step, end_time, duration_s in update.get("steps", []):
            self.goodput.add_step(attempt=attempt, step=step, end_time=end_time, duration_s=duration_s)
        self.goodput.add_checkpoint(update.get("checkpoint_s", 0.0))
        self.update_goodput()

    def update_goodput(self) -> None:
        now = time.time()
        for part, seconds in self.goodput.parts(now).items():
            if part in PARTS:
                self.wall_seconds.labels(self.run_name, part).set(seconds)
        self.goodput_ratio.labels(self.run_name).set(self.goodput.goodput(now))

    def record_hang(self) -> None:
        self.hangs.labels(self.run_name).inc()
        self._hang_since_last_attempt = True

    def record_preemption(self) -> None:
        """Mark the next restart as caused by SIGTERM to a worker (after its checkpoint committed)."""
        self._preempted_since_last_attempt = True

    def record_rank_times(self, busy_seconds: list[float], stragglers: list[int]) -> None:
        for rank, seconds in enumerate(busy_seconds):
            self.rank_busy_seconds.labels(self.run_name, str(rank)).set(seconds)
            self.straggler.labels(self.run_name, str(rank)).set(1 if rank in stragglers else 0)

    def record_checkpoint(self, step: int, save_seconds: float) -> None:
        self.checkpoint_save_seconds.labels(self.run_name).observe(save_seconds)
        self.last_committed_step.labels(self.run_name).set(step)
        self.last_checkpoint_timestamp_seconds.labels(self.run_name).set_to_current_time()

    def record_checkpoint_load(self, seconds: float, loaded_bytes: int) -> None:
        self.checkpoint_load_seconds.labels(self.run_name).observe(seconds)
        self.checkpoint_loaded_bytes.labels(self.run_name).inc(loaded_bytes)

    def record_checkpoint_save(self, update: dict[str, Any]) -> None:
        """Record a committed save's stall (stall_s) and size (bytes); its duration comes through record_checkpoint."""
        self.checkpoint_stall_seconds.labels(self.run_name).observe(update["stall_s"])
        self.checkpoint_size_bytes.labels(self.run_name).set(update["bytes"])
        self.checkpoint_written_bytes.labels(self.run_name).inc(update["bytes"])


@ray.remote(num_cpus=0)
class MetricsActor:
    """Serves ``RunMetrics`` over HTTP for Prometheus to scrape."""

    def __init__(self, run_name: str, host: str, port: int, serve: bool = True,
                 wandb_settings: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None):
        self.metrics = RunMetrics(run_name)
        self.host, self.port = host, None
        if serve:
            server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
            self.port = server.server_port
        self.tracker = open_tracker(run_name, wandb_settings, run_config or {})

    def address(self) -> tuple[str, int | None]:
        return self.host, self.port

    def record_attempt(self, attempt: int, world_size: int) -> None:
        self.metrics.record_attempt(attempt, world_size)

    def record_progress(self, update: dict[str, Any]) -> None:
        self.metrics.record_progress(update)
        if self.tracker is not None:
            self.tracker.log_progress(
                update, goodput_ratio=self.metrics.goodput.goodput(time.time()), restarts=self.metrics.restart_count,
                world_size=self.metrics.current_world_size,
            )

    def record_checkpoint(self, step: int, save_seconds: float) -> None:
        self.metrics.record_checkpoint(step, save_seconds)
        if self.tracker is not None:
            self.tracker.log_checkpoint(step, save_seconds)

    def record_checkpoint_save(self, update: dict[str, Any]) -> None:
        self.metrics.record_checkpoint_save(update)

    def record_checkpoint_load(self, seconds: float, loaded_bytes: int) -> None:
        self.metrics.record_checkpoint_load(seconds, loaded_bytes)

    def record_checkpoint_failure(self) -> None:
        self.metrics.checkpoint_failures.labels(self.metrics.run_name).inc()

    def record_checkpoint_skipped(self) -> None:
        self.metrics.checkpoint_skipped.labels(self.metrics.run_name).inc()

    def record_hang(self) -> None:
        self.metrics.record_hang()

    def record_preemption(self) -> None:
        self.metrics.record_preemption()

    def record_rank_times(self, busy_seconds: list[float], stragglers: list[int]) -> None:
        self.metrics.record_rank_times(busy_seconds, stragglers)

    def mark_known_steps(self, steps: list[int]) -> None:
        self.metrics.goodput.mark_known_steps(set(steps))

    def request_stop(self) -> None:
        self.metrics._stop_requested = True

    def stop_requested(self) -> bool:
        return self.metrics._stop_requested

    def goodput_parts(self) -> dict[str, float]:
        self.metrics.update_goodput()
        return self.metrics.goodput.parts(time.time())

    def restarts(self) -> int:
        return self.metrics.restart_count

    def mean_mfu(self) -> float | None:
        """Return the mean MFU over the logging intervals of this driver session, or None without a peak."""
        values = self.metrics.mfu_values
        return sum(values) / len(values) if values else None

    def finish_tracking(self) -> None:
        """Write the final goodput, restarts and MFU to W&B and close its run; a no-op without W&B."""
        if self.tracker is None:
            return
        summary = {f"goodput/{part}_s": seconds for part, seconds in self.goodput_parts().items()}
        summary["goodput/ratio"] = self.metrics.goodput.goodput(time.time())
        summary["restarts"] = self.metrics.restart_count
        if self.mean_mfu() is not None:
            summary["train/mean_mfu"] = self.mean_mfu()
        self.tracker.finish(summary)
        self.tracker = None


def metrics_actor_name(run_name: str) -> str:
    return f"stalwart-metrics-{run_name}"
