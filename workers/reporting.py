"""Progress output of rank 0: a log line, the step history in storage, and metric updates.

The history is one JSONL part per logging interval under
``<run>/history/attempt-NNNN/part-NNNNNN.jsonl``, so it survives the driver and
works on object stores, which cannot append to a file. Parts are numbered in
write order: after a rollback the recomputed steps land in later parts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from service.storage import filesystem, join, with_retries, write_bytes
from workers.flops import mfu

logger = logging.getLogger(__name__)

HISTORY_DIR = "history"


@dataclass
class StepRecord:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool  # the optimizer step was not applied
    attempt: int
    world_size: int
    time: float
    action: str = "step"  # step, skip, rollback or overflow
    events: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0  # compute and update time of the step, checkpoint save excluded
    checkpoint_s: float = 0.0  # time the step loop was blocked saving a checkpoint after this step
    samples: list[int] | None = None  # sample indices of the step, all ranks (run.record_samples only)


def attempt_dir_name(attempt: int) -> str:
    return f"attempt-{attempt:04d}"


class ProgressReporter:
    """Buffers step records on rank 0 and flushes them every logging interval."""

    def __init__(self, *, run_name: str, run_uri: str, attempt: int, world_size: int,
                 storage_options: dict[str, Any], metrics_actor: Any | None, total_steps: int,
                 flops_per_token: float | None = None, peak_flops_per_device: float | None = None,
                 retry_s: float = 0.0):
        """``retry_s``: how long a history write retries a storage error (``data.read_retry_s``)."""
        self.run_name = run_name
        self.retry_s = retry_s
        # MFU needs both; without a peak (CPU, or a GPU not in the table) it is not reported.
        self.flops_per_token = flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.attempt = attempt
        self.world_size = world_size
        self.total_steps = total_steps
        self._history_uri = join(run_uri, HISTORY_DIR, attempt_dir_name(attempt))
        self._fs = filesystem(run_uri, storage_options)
        self._metrics_actor = metrics_actor
        self._records: list[StepRecord] = []
        self._part = 0
        self._interval_started = time.monotonic()

    def add(self, record: StepRecord) -> None:
        self._records.append(record)

    def flush(self) -> None:
        """Write the buffered steps, log one progress line and update the metrics."""
        if not self._records:
            return
        records, self._records = self._records, []
        elapsed_s = max(time.monotonic() - self._interval_started, 1e-9)
        self._interval_started = time.monotonic()
        last = records[-1]
        tokens = sum(record.tokens for record in records)
        skipped = sum(record.skipped for record in records)
        events = [event for record in records for event in record.events]
        tokens_per_second = tokens / elapsed_s
        mfu_ratio = None
        if self.flops_per_token and self.peak_flops_per_device:
            mfu_ratio = mfu(tokens_per_second, self.flops_per_token, self.peak_flops_per_device, self.world_size)

        payload = "".join(json.dumps(asdict(record)) + "\n" for record in records).encode("utf-8")
        self._part += 1
        part_uri = join(self._history_uri, f"part-{self._part:06d}.jsonl")
        with_retries(lambda: write_bytes(self._fs, part_uri, payload), description=f"writing {part_uri}",
                     budget_s=self.retry_s, setting="data.read_retry_s")

        logger.info(
            "run=%s attempt=%d step=%d/%d loss=%.4f lr=%.3e grad_norm=%.3f tokens/s=%.0f%s%s",
            self.run_name, self.attempt, last.step, self.total_steps, last.loss, last.lr,
            last.grad_norm, tokens_per_second, "" if mfu_ratio is None else f" mfu={mfu_ratio:.2%}",
            f" skipped={skipped}" if skipped else "",
        )
        if self._metrics_actor is not None:
            self._metrics_actor.record_progress.remote(
                {
                    "step": last.step, "loss": last.loss, "lr": last.lr, "grad_norm": last.grad_norm,
                    "tokens_per_second": tokens_per_second, "tokens": tokens, "skipped_steps": skipped,
                    "mfu": mfu_ratio,
                    "events": events,
                    "steps": [[record.attempt, record.step, record.time, record.duration_s] for record in records],
                    "checkpoint_s": sum(record.checkpoint_s for record in records),
                }
            )

    @property
    def last_loss(self) -> float:
        return self._records[-1].loss if self._records else float("nan")

    def checkpoint_stalled(self, step: int, stall_s: float) -> None:
        """Count the time the step loop was blocked starting a checkpoint save after ``step``."""
        if self._records and self._records[-1].step == step:
            self._records[-1].checkpoint_s += stall_s

    def checkpoint_saved(self, step: int, save_seconds: float) -> None:
        """Log a committed checkpoint and export its save duration (in the background for async saves)."""
        logger.info("run=%s attempt=%d step=%d checkpoint committed in %.2f s", self.run_name, self.attempt, step, save_seconds)
        if self._metrics_actor is not None:
            self._metrics_actor.record_checkpoint.remote(step, save_seconds)


def read_history(run_uri: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Return every step record of a run in the order it was written: by attempt, then part, then line."""
    fs = filesystem(run_uri, storage_options)
    pattern = join(run_uri, HISTORY_DIR, "attempt-*", "part-*.jsonl")
    records: list[dict[str, Any]] = []
    # Zero-padded names make text order equal to numeric order here.
    for path in sorted(fs.glob(pattern)):
        for line in fs.cat_file(path).decode("utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def final_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """Return the loss of each step from the last time it ran (recomputed steps replace earlier ones)."""
    return {record["step"]: record["loss"] for record in records}
