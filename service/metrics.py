"""Prometheus metrics of a run, served by a Ray actor on the driver's node.

The actor outlives worker-group restarts, so counters such as restarts keep
counting across attempts. Workers send it one update per logging interval.
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
LAST_COMMITTED_STEP = f"{METRIC_PREFIX}_last_committed_step"
WORLD_SIZE = f"{METRIC_PREFIX}_world_size"
STABILITY_EVENTS = f"{METRIC_PREFIX}_stability_events"  # counter, labels detector and action

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
        self.restarts = Counter(RESTARTS, "Worker-group restarts after a failure.", labels, registry=self.registry)
        self.checkpoint_save_seconds = Histogram(
            CHECKPOINT_SAVE_SECONDS, "Wall time of a checkpoint save, commit included.", labels,
            buckets=SAVE_SECONDS_BUCKETS, registry=self.registry,
        )
        self.last_committed_step = Gauge(LAST_COMMITTED_STEP, "Step of the newest committed checkpoint.", labels, registry=self.registry)
        self.world_size = Gauge(WORLD_SIZE, "Ranks in the current attempt.", labels, registry=self.registry)
        self.stability_events = Counter(
            STABILITY_EVENTS, "Stability detections by detector (nonfinite, loss_zscore, grad_norm_ratio, loss_ratio, "
            "overflow) and the action taken (log, skip, rollback).", ["run", "detector", "action"], registry=self.registry,
        )
        # Create every labelled series now, so counters read 0 instead of being absent.
        for family in (self.step, self.loss, self.learning_rate, self.grad_norm, self.tokens_per_second, self.tokens,
                       self.skipped_steps, self.restarts, self.checkpoint_save_seconds, self.last_committed_step,
                       self.world_size):
            family.labels(run_name)
        self.restart_count = 0
        self._attempts_seen: set[int] = set()

    def record_attempt(self, attempt: int, world_size: int) -> None:
        """Count a restart for every new attempt after the first one this driver saw."""
        if self._attempts_seen and attempt not in self._attempts_seen:
            self.restarts.labels(self.run_name).inc()
            self.restart_count += 1
        self._attempts_seen.add(attempt)
        self.world_size.labels(self.run_name).set(world_size)

    def record_progress(self, update: dict[str, Any]) -> None:
        run = self.run_name
        self.step.labels(run).set(update["step"])
        self.loss.labels(run).set(update["loss"])
        self.learning_rate.labels(run).set(update["lr"])
        self.grad_norm.labels(run).set(update["grad_norm"])
        self.tokens_per_second.labels(run).set(update["tokens_per_second"])
        self.tokens.labels(run).inc(update["tokens"])
        if update.get("skipped_steps"):
            self.skipped_steps.labels(run).inc(update["skipped_steps"])
        for event in update.get("events", []):
            self.stability_events.labels(run, event["detector"], event["action"]).inc()

    def record_checkpoint(self, step: int, save_seconds: float) -> None:
        self.checkpoint_save_seconds.labels(self.run_name).observe(save_seconds)
        self.last_committed_step.labels(self.run_name).set(step)


@ray.remote(num_cpus=0)
class MetricsActor:
    """Serves ``RunMetrics`` over HTTP for Prometheus to scrape."""

    def __init__(self, run_name: str, host: str, port: int):
        self.metrics = RunMetrics(run_name)
        server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        self.host = host
        self.port = server.server_port
        self.started_at = time.time()

    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def record_attempt(self, attempt: int, world_size: int) -> None:
        self.metrics.record_attempt(attempt, world_size)

    def record_progress(self, update: dict[str, Any]) -> None:
        self.metrics.record_progress(update)

    def record_checkpoint(self, step: int, save_seconds: float) -> None:
        self.metrics.record_checkpoint(step, save_seconds)

    def restarts(self) -> int:
        return self.metrics.restart_count


def metrics_actor_name(run_name: str) -> str:
    return f"stalwart-metrics-{run_name}"
