"""When to save, and saving in the background while training goes on.

``Checkpointer`` is the training loop's only entry point for saves. ``save``
stages a CPU copy of the model and optimizer shards on the training thread (the
stall) and hands it to a background thread. That thread writes and commits the
copy over a gloo process group of its own, because DCP's collectives running
beside the step's collectives on one group corrupt each other's traffic.

At most one save is in flight. When the next save is due while one runs,
``checkpoint.overlap_policy`` decides: ``wait`` blocks training until the
running save ends, ``skip`` drops the new save; either way it is logged. Saves
for the final step, SIGTERM and preemption always wait, and always block until
they commit.

Time-based decisions (``every_hours``, retry backoff, the outage budget) use
rank 0's clock, which every rank receives in a tiny all-reduce, so all ranks
decide the same thing at the same step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from service.catalog import checkpoint_uri
from service.config import CheckpointSection
from workers.checkpoint import (
    CheckpointSaveError,
    SaveOutcome,
    SaveRequest,
    SaveSettings,
    TrainState,
    rng_state_payload,
    Stager,
    write_and_commit,
)

logger = logging.getLogger(__name__)

# Saves that must commit before the caller goes on: the process may end right after them.
BLOCKING_REASONS = frozenset({"final", "sigterm", "preemption"})


class CheckpointStorageError(CheckpointSaveError):
    """Saves kept failing for longer than ``checkpoint.max_outage_s``; the run stops."""


@dataclass
class _InFlight:
    request: SaveRequest
    future: Future[SaveOutcome]
    launched_at: float  # this rank's time.perf_counter() at the launch
    # Time the step loop was blocked for this save, by cause.
    stage_s: float = 0.0
    poll_s: float = 0.0
    wait_s: float = 0.0
    launched_clock: float | None = None  # rank 0's clock at the first poll after the launch

    @property
    def stall_s(self) -> float:
        return self.stage_s + self.poll_s + self.wait_s


@dataclass
class _Poll:
    """An all-reduce started at one step and read at the next, so no rank waits for the others in it."""

    work: Any
    values: torch.Tensor
    inflight: _InFlight | None  # the save whose state this poll reports


def _run_in_thread(function: Callable[[], SaveOutcome], name: str) -> Future[SaveOutcome]:
    """Run ``function`` on a new daemon thread; a save stuck in I/O must not keep the process alive at exit."""
    future: Future[SaveOutcome] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function())
        except BaseException as error:  # noqa: BLE001 (handed to the waiting thread)
            future.set_exception(error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


class Checkpointer:
    """Save policy and background saves of one rank; every method is a collective unless its docstring states otherwise.

    ``on_commit(outcome, stall_s)`` runs on the training thread of every rank, at the same step,
    once a save has committed.
    """

    def __init__(self, *, settings: CheckpointSection, run_uri: str, storage_options: dict[str, Any],
                 saved_config: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 world_rank: int, world_size: int, total_steps: int, attempt: int = 0,
                 on_commit: Callable[[SaveOutcome, float], None] | None = None, metrics_actor: Any | None = None,
                 log_prefix: str = ""):
        self.settings = settings
        self.run_uri = run_uri
        self.saved_config = saved_config
        self.model = model
        self.optimizer = optimizer
        self.world_rank = world_rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.attempt = attempt
        self.on_commit = on_commit
        self.metrics_actor = metrics_actor
        self.log_prefix = log_prefix
        self.save_settings = SaveSettings(
            storage_options=storage_options, keep_last=settings.keep_last, keep_every_steps=settings.keep_every_steps,
            part_bytes=settings.upload_part_bytes, upload_concurrency=settings.upload_concurrency,
        )
        # Every rank creates the group at the same point, before any save.
        self.group = dist.new_group(backend="gloo") if settings.async_save else None
        self.inflight: _InFlight | None = None
        self.requested: str | None = None
        self.last_save_clock: float | None = None  # rank 0's clock when the last save was decided
        self.failures = 0  # consecutive failed saves
        self.outage_started_clock: float | None = None
        self.retry_clock: float | None = None
        self.skipped_saves = 0
        self.due_blocked_s = 0.0  # seconds the last due() call blocked the step loop
        self.last_outcome: SaveOutcome | None = None
        self.poll: _Poll | None = None
        self.stager = Stager()
        self.last_stall: dict[str, float] = {}  # breakdown of the last committed save's stall

    # Logging and metrics, from rank 0.

    def log(self, level: int, message: str, *args: Any) -> None:
        if self.world_rank == 0:
            logger.log(level, self.log_prefix + message, *args)

    def _record_metric(self, method: str, *args: Any) -> None:
        if self.world_rank == 0 and self.metrics_actor is not None:
            getattr(self.metrics_actor, method).remote(*args)

    # Agreement.

    def _start_poll(self) -> None:
        """Start an all-reduce of (this rank's save still running, rank 0's clock) on the training group."""
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        running = self.inflight is not None and not self.inflight.future.done()
        clock = time.monotonic() if self.world_rank == 0 else 0.0
        values = torch.tensor([1.0 if running else 0.0, clock], dtype=torch.float64, device=device)
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True)
        self.poll = _Poll(work=work, values=values, inflight=self.inflight)

    def _finish_poll(self) -> tuple[bool, float] | None:
        """Read the poll started at the previous step: (whether that save was done on every rank, rank 0's clock)."""
        if self.poll is None:
            return None
        poll, self.poll = self.poll, None
        poll.work.wait()
        all_done = poll.values[0].item() == 0.0 and poll.inflight is not None and poll.inflight is self.inflight
        return all_done, poll.values[1].item()

    # The policy.

    def request(self, reason: str = "requested") -> None:
        """Ask for a save at the next step boundary (from the stability logic, say); not a collective.

        Every rank must make the same request at the same step, as decisions from all-reduced values do.
        """
        self.requested = reason

    def due(self, step: int) -> str | None:
        """Collect a finished background save, then return why a save is due after ``step``, or None.

        Decisions use the poll started at the previous step, so every rank sees the same values;
        a commit is noticed one step after every rank finished it. The time this call blocked,
        including any wait for a save past ``max_inflight_steps``, is left in ``due_blocked_s``.
        """
        started = time.perf_counter()
        try:
            return self._due(step)
        finally:
            self.due_blocked_s = time.perf_counter() - started

    def _due(self, step: int) -> str | None:
        settings = self.settings
        started = time.perf_counter()
        polled = self._finish_poll()
        clock = polled[1] if polled is not None else None
        if clock is not None and self.last_save_clock is None:
            self.last_save_clock = clock  # every_hours counts from the first poll of this attempt
        if self.inflight is not None:
            if clock is not None and self.inflight.launched_clock is None:
                self.inflight.launched_clock = clock
            if polled is not None and polled[0]:
                self._collect()
            else:
                self._check_inflight(step, clock)
        if self.inflight is not None or self.retry_clock is not None or settings.every_hours is not None:
            self._start_poll()
        if self.inflight is not None:
            self.inflight.poll_s += time.perf_counter() - started

        if settings.save_final and step == self.total_steps:
            reason = "final"
        elif settings.every_steps is not None and step % settings.every_steps == 0:
            reason = "interval"
        elif self.requested is not None:
            reason = self.requested
        elif settings.every_hours is not None and clock is not None and clock - self.last_save_clock >= settings.every_hours * 3600:
            reason = "time"
        elif self.retry_clock is not None and clock is not None and clock >= self.retry_clock:
            reason = "retry"
        else:
            return None
        self.requested = None
        if clock is not None:
            self.last_save_clock = clock
        return reason

    def _check_inflight(self, step: int, clock: float | None) -> None:
        """Wait for a save that has run past ``max_inflight_steps``; fail one that has run past the outage budget."""
        assert self.inflight is not None
        launched_step = self.inflight.request.step
        limit = self.settings.max_inflight_steps
        if limit is not None and step - launched_step >= limit:
            self.log(logging.INFO, "step=%d waiting for the save of step %d (checkpoint.max_inflight_steps=%d)", step, launched_step, limit)
            self._wait_and_collect()
            return
        if clock is None or self.inflight.launched_clock is None:
            return
        running_s = clock - self.inflight.launched_clock
        if running_s > self.settings.max_outage_s:
            raise CheckpointStorageError(
                f"the checkpoint save of step {launched_step} has run for {running_s:.0f} s, longer than "
                f"checkpoint.max_outage_s={self.settings.max_outage_s:g}; check that the checkpoint storage answers, "
                "or raise checkpoint.max_outage_s"
            )

    # Saving.

    def save(self, step: int, train_state: TrainState, *, loss: float | None, reason: str = "interval") -> float:
        """Start a save of the current state; return the seconds the step loop was blocked.

        Blocking reasons (final, sigterm, preemption) and ``async_save: false`` return only after
        the save committed, retrying with backoff; they raise ``CheckpointStorageError`` when the
        outage outlasts ``checkpoint.max_outage_s``.
        """
        started = time.perf_counter()
        blocking = reason in BLOCKING_REASONS or not self.settings.async_save
        if self.inflight is not None:
            running = self.inflight.request.step
            if blocking or self.settings.overlap_policy == "wait":
                self.log(logging.INFO, "step=%d save (reason=%s) waits for the save of step %d still in flight "
                         "(checkpoint.overlap_policy=%s)", step, reason, running, self.settings.overlap_policy)
                self._wait_and_collect()
            else:
                self.skipped_saves += 1
                self.log(logging.WARNING, "step=%d save (reason=%s) skipped: the save of step %d is still in flight "
                         "(checkpoint.overlap_policy=skip; %d skipped so far)", step, reason, running, self.skipped_saves)
                self._record_metric("record_checkpoint_skipped")
                return time.perf_counter() - started

        staging_started = time.perf_counter()
        request = SaveRequest(
            step=step, checkpoint_id=checkpoint_uri(self.run_uri, step), run_uri=self.run_uri,
            state=self.stager.stage(self.model, self.optimizer), rng=rng_state_payload(),
            train_state=TrainState.from_dict(train_state.to_dict()).to_dict(), config=self.saved_config,
            world_rank=self.world_rank, world_size=self.world_size, reason=reason, loss=loss,
            extra={"attempt": self.attempt},
        )
        self.retry_clock = None
        self._launch(request, time.perf_counter() - staging_started)
        if blocking:
            self._wait_until_committed()
        return time.perf_counter() - started

    def _launch(self, request: SaveRequest, stage_s: float) -> None:
        group = self.group
        launched_at = time.perf_counter()
        if self.settings.async_save:
            future = _run_in_thread(lambda: write_and_commit(request, self.save_settings, group), f"stalwart-save-{request.step}")
        else:
            future = Future()
            future.set_result(write_and_commit(request, self.save_settings, None))
        # A synchronous write counts as a wait: the step loop was blocked for all of it.
        self.inflight = _InFlight(request=request, future=future, launched_at=launched_at, stage_s=stage_s,
                                  wait_s=0.0 if self.settings.async_save else time.perf_counter() - launched_at)
        self.log(logging.INFO, "step=%d checkpoint save started (reason=%s)", request.step, request.reason)

    def _wait_and_collect(self) -> SaveOutcome:
        """Block until the in-flight save ends on this rank; its outcome is the same on every rank.

        Raises ``CheckpointStorageError`` when the save is still running ``max_outage_s`` after it started:
        a write to a server that accepts connections but never responds may not time out by itself.
        """
        assert self.inflight is not None
        started = time.perf_counter()
        remaining_s = self.settings.max_outage_s - (started - self.inflight.launched_at)
        try:
            self.inflight.future.result(timeout=max(remaining_s, 0.0))
        except FutureTimeoutError:
            raise CheckpointStorageError(
                f"the checkpoint save of step {self.inflight.request.step} has run for more than "
                f"checkpoint.max_outage_s={self.settings.max_outage_s:g} s; check that the checkpoint storage answers, "
                "or raise checkpoint.max_outage_s"
            ) from None
        self.inflight.wait_s += time.perf_counter() - started
        return self._collect()

    def _wait_until_committed(self) -> None:
        """Wait for the in-flight save; after a failure, retry the same staged state until it commits."""
        while True:
            assert self.inflight is not None
            request = self.inflight.request
            outcome = self._wait_and_collect()
            if outcome.committed:
                return
            delay_s = self._backoff_s()
            self.log(logging.WARNING, "step=%d retrying the blocking save in %.1f s", request.step, delay_s)
            # Every rank sleeps the same delay; the save's first collective aligns them again.
            time.sleep(delay_s)
            self._launch(request, 0.0)

    def _backoff_s(self) -> float:
        settings = self.settings
        return min(settings.retry_max_backoff_s, settings.retry_initial_backoff_s * 2 ** max(0, self.failures - 1))

    def _collect(self) -> SaveOutcome:
        """Handle the finished in-flight save: report a commit, or schedule a retry and enforce the outage budget."""
        assert self.inflight is not None
        inflight, self.inflight = self.inflight, None
        outcome = inflight.future.result()
        self.last_outcome = outcome
        step = outcome.step
        if outcome.committed:
            if self.failures:
                self.log(logging.INFO, "step=%d checkpoint storage is back after %d failed saves", step, self.failures)
            self.failures = 0
            self.outage_started_clock = None
            self.log(logging.INFO, "step=%d checkpoint committed: %.1f MB in %.2f s in the background, training blocked "
                     "%.3f s (staging %.3f s, polls %.3f s, waits %.3f s)%s",
                     step, outcome.total_bytes / 1e6, outcome.duration_s, inflight.stall_s, inflight.stage_s,
                     inflight.poll_s, inflight.wait_s,
                     f"; retention deleted steps {outcome.deleted_steps}" if outcome.deleted_steps else "")
            self._record_metric("record_checkpoint_save", {"step": step, "stall_s": inflight.stall_s,
                                                           "duration_s": outcome.duration_s, "bytes": outcome.total_bytes})
            self.last_stall = {"stage_s": inflight.stage_s, "poll_s": inflight.poll_s, "wait_s": inflight.wait_s}
            if self.on_commit is not None:
                self.on_commit(outcome, inflight.stall_s)
            return outcome

        self.failures += 1
        self._record_metric("record_checkpoint_failure")
        if self.outage_started_clock is None:
            self.outage_started_clock = outcome.started_clock
        outage_s = outcome.finished_clock - self.outage_started_clock
        self.log(logging.ERROR, "step=%d checkpoint save failed (%d in a row, storage failing for %.0f s): %s",
                 step, self.failures, outage_s, outcome.error)
        if outage_s > self.settings.max_outage_s:
            raise CheckpointStorageError(
                f"checkpoint saves have failed for {outage_s:.0f} s ({self.failures} attempts, the last at step {step}), "
                f"longer than checkpoint.max_outage_s={self.settings.max_outage_s:g}. Last error: {outcome.error}. "
                "Check that the checkpoint storage is reachable, or raise checkpoint.max_outage_s"
            )
        self.retry_clock = outcome.finished_clock + self._backoff_s()
        self.log(logging.WARNING, "step=%d next save attempt in %.1f s or at the next scheduled save", step, self._backoff_s())
        return outcome

    def wait(self) -> None:
        """Block until no save is in flight (before a rollback loads a checkpoint, or at the end of a run)."""
        if self.inflight is not None:
            self._wait_and_collect()

    def close(self) -> None:
        """Wait for the in-flight save, then free the checkpoint process group."""
        self.wait()
        if self.poll is not None:
            self.poll.work.wait()  # every rank started it, so it completes
            self.poll = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
