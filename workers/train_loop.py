"""The per-worker training function that Ray Train runs on every rank.

A run resumes from the newest committed checkpoint in storage whenever one
exists, whether this is a fresh driver or Ray Train's restart after a worker
failure: storage, not the Ray cluster's memory, is the source of truth.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from service.catalog import committed_newest_first, read_commit_record
from service.config import Config
from service.storage import filesystem, join, read_json, with_retries, write_json
from workers.async_save import Checkpointer
from workers.checkpoint import SaveOutcome, TrainState, load_checkpoint, load_newest_valid, seed_rank_rng
from workers.data import BatchPrefetcher, SampleOrder, TokenDataset, rank_micro_batches
from workers.faults import fire_hang_faults, fire_kill_faults, fire_remove_node_faults, slow_fault_delay_s, spike_multiplier
from workers.flops import current_device_peak, training_flops_per_token
from workers.model import ModelArgs, build_model
from workers.preemption import SigtermWatcher, WorkerPreempted, install_in_worker_process, sigterm_received
from workers.parallel import ParallelModel, ShardedAdamW, build_device_mesh, parallelize
from workers.reporting import ProgressReporter, StepRecord
from workers.schedule import lr_multiplier
from workers.stability import DataSkips, DetectorSettings, DynamicLossScaler, SpikeAbort, SpikeMonitor, StabilityEvent
from workers.step import apply_update, compute_gradients
from workers.watchdog import HangWatchdog, kill_this_process

logger = logging.getLogger(__name__)

ATTEMPTS_DIR = "attempts"
DATA_SKIPS_FILE = "data_skips.json"
ABORT_FILE = "ABORTED.json"
HANGS_DIR = "hangs"
RANKS_DIR = "ranks"
PREEMPTION_RECORD_TIMEOUT_S = 10.0
STOP_POLL_INTERVAL_S = 2.0


@dataclass(frozen=True)
class WorkerContext:
    world_rank: int
    world_size: int
    local_rank: int
    device: torch.device


def configure_worker_logging() -> None:
    """Send this project's INFO logs to stdout, which Ray forwards to the driver; the root logger is left alone."""
    for name in ("workers", "service"):
        package_logger = logging.getLogger(name)
        if not package_logger.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            package_logger.addHandler(handler)
            package_logger.setLevel(logging.INFO)
            package_logger.propagate = False


def build_optimizer(model: torch.nn.Module, config: Config, parallel: ParallelModel | None = None,
                    device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights are not decayed).

    Under zero1 (``parallel.shard_optimizer_state``) the same update runs in ``ShardedAdamW``.
    """
    decay = [param for param in model.parameters() if param.ndim >= 2]
    no_decay = [param for param in model.parameters() if param.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if parallel is not None and parallel.shard_optimizer_state:
        return ShardedAdamW(groups, mesh=parallel.mesh, lr=config.optim.lr, betas=config.optim.betas,
                            eps=config.optim.eps, weight_decay=config.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
                             **adamw_kernels(config.optim.implementation, device_type))


def adamw_kernels(implementation: str, device_type: str) -> dict[str, bool | None]:
    """Return AdamW's ``foreach`` and ``fused`` arguments for ``optim.implementation`` on this device type."""
    if implementation == "auto":
        implementation = "fused" if device_type == "cuda" else "foreach"
    if implementation == "fused":
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def model_args(config: Config) -> ModelArgs:
    return ModelArgs(**config.model.model_dump())


def next_attempt(run_uri: str, storage_options: dict[str, Any], context: WorkerContext, started_at: float) -> int:
    """Agree on this attempt's number: rank 0 counts earlier attempts in storage and broadcasts."""
    number = torch.zeros(1, dtype=torch.int64)
    if context.world_rank == 0:
        fs = filesystem(run_uri, storage_options)
        existing = fs.glob(join(run_uri, ATTEMPTS_DIR, "attempt-*.json"))
        attempt = 1 + max((int(path.rsplit("-", 1)[-1].removesuffix(".json")) for path in existing), default=0)
        write_json(fs, join(run_uri, ATTEMPTS_DIR, f"attempt-{attempt:04d}.json"),
                   {"attempt": attempt, "world_size": context.world_size, "started_at": started_at})
        number[0] = attempt
    dist.broadcast(number, src=0)
    return int(number.item())


def rank_process_file(run_uri: str, attempt: int, world_rank: int) -> str:
    """Return the path of the file with the process id and Ray node of one rank in one attempt."""
    return join(run_uri, RANKS_DIR, f"attempt-{attempt:04d}-rank-{world_rank:05d}.json")


def report_end_to_ray(step: int, tokens_seen: int, **extra: Any) -> None:
    """Report the step an attempt ended at to Ray Train, once per attempt.

    Stalwart's catalog in storage, not Ray, decides what to resume from, so no
    checkpoint is handed to Ray (it would go into Ray's run snapshot, and Ray refuses
    to start the next driver session once retention has deleted it). Nor is each
    commit reported. In Ray 2.60 a worker's results wait in a queue of one until the
    controller polls the worker group, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``. So a
    report made within one poll interval of the previous one blocks until that poll, and
    with a save every second that blocked the step loop about 1 s per save.
    """
    ray.train.report({"step": step, "tokens_seen": tokens_seen, **extra})


def build_spike_monitor(config: Config) -> SpikeMonitor:
    section = config.stability
    detectors = [
        DetectorSettings(name, metric, kind, settings.threshold, settings.policy)
        for name, metric, kind, settings in (
            ("loss_zscore", "loss", "zscore", section.loss_zscore),
            ("grad_norm_ratio", "grad_norm", "median_ratio", section.grad_norm_ratio),
            ("loss_ratio", "loss", "ratio", section.loss_ratio),
        )
        if settings.enabled
    ]
    return SpikeMonitor(detectors, window=section.window, nonfinite_policy=section.nonfinite_policy,
                        max_events=section.max_events, event_window_steps=section.event_window_steps)


class Trainer:
    """One attempt of one rank: set up, resume, then step until ``train.steps``."""

    def __init__(self, loop_config: dict[str, Any]):
        self.started_at = time.time()
        self.config = Config.model_validate(loop_config["config"])
        self.run_uri: str = loop_config["run_uri"]
        self.storage_options: dict[str, Any] = self.config.storage.options
        self.saved_config: dict[str, Any] = loop_config["saved_config"]
        self.fs = filesystem(self.run_uri, self.storage_options)

        config = self.config
        ray_context = ray.train.get_context()
        use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
        local_rank = ray_context.get_local_rank()
        device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        else:
            # One thread per CPU Ray gave this worker, so ranks do not oversubscribe cores.
            torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
        self.context = WorkerContext(ray_context.get_world_rank(), ray_context.get_world_size(), local_rank, device)
        self.is_rank0 = self.context.world_rank == 0
        mesh = build_device_mesh(device.type, self.context.world_size, config.parallel)

        self.refuse_if_aborted()
        self.attempt = next_attempt(self.run_uri, self.storage_options, self.context, self.started_at)
        self.record_rank_process()
        self.metrics_actor = self.find_metrics_actor(loop_config.get("metrics_actor"))
        if self.metrics_actor is not None and self.is_rank0:
            self.metrics_actor.record_attempt.remote(self.attempt, self.context.world_size)

        # Model and optimizer: identical init on every rank from the seed, then sharded or wrapped by the strategy.
        model = build_model(model_args(config), seed=config.run.seed)
        model.to(device)
        self.parallel = parallelize(model, config.parallel, mesh, compile_blocks=config.train.compile)
        self.model = self.parallel.module
        self.fsdp_units = self.parallel.sync_units
        self.optimizer = build_optimizer(self.model, config, self.parallel, device.type)
        self.checkpointer = Checkpointer(
            settings=config.checkpoint, run_uri=self.run_uri, storage_options=self.storage_options,
            saved_config=self.saved_config, model=self.model, optimizer=self.optimizer,
            world_rank=self.context.world_rank, world_size=self.context.world_size, total_steps=config.train.steps,
            attempt=self.attempt, on_commit=self.on_checkpoint_committed,
            metrics_actor=self.metrics_actor, log_prefix=f"run={config.run.name} attempt={self.attempt} ",
        )

        self.dataset = TokenDataset(loop_config["dataset_uri"], config.model.seq_len, self.storage_options,
                                    retry_s=config.data_read_retry_s)
        self.order = SampleOrder(self.dataset.num_samples, config.run.seed)
        self.prefetcher = BatchPrefetcher(self.dataset, enabled=config.train.prefetch, pin_memory=use_gpu)
        self.monitor = build_spike_monitor(config)
        self.loss_scaler = None
        if config.parallel.param_dtype == "float16":
            self.loss_scaler = DynamicLossScaler(config.parallel.init_loss_scale,
                                                 growth_interval=config.parallel.loss_scale_growth_interval,
                                                 min_scale=config.parallel.min_loss_scale)
        self.train_state = TrainState()
        self.data_skips = DataSkips()
        self.last_saved_step = 0
        self.stop_requested = threading.Event()
        self.stop_agreed = False
        self.driver_stop_agreed = False
        self.preempted_ranks = 0
        self.slow_intervals: dict[int, int] = {}
        self.busy_times_s: list[float] = []
        self.prep_times_s: list[float] = []  # seconds from step start to data ready, per step
        tolerance = config.fault_tolerance
        self.watchdog = HangWatchdog(
            fixed_timeout_s=tolerance.hang_timeout_s, floor_s=tolerance.hang_timeout_floor_s,
            step_multiple=tolerance.hang_timeout_step_multiple, on_hang=self.on_hang,
        )
        self.sigterm_watcher = SigtermWatcher(
            f"run={config.run.name} attempt={self.attempt} rank={self.context.world_rank}", tolerance.stop_grace_s,
        )
        self.sigterm_watcher.start()
        self.current_step = 0
        self.step_samples: list[int] | None = None
        self.reporter = None
        if self.is_rank0:
            self.reporter = ProgressReporter(
                run_name=config.run.name, run_uri=self.run_uri, attempt=self.attempt,
                world_size=self.context.world_size, storage_options=self.storage_options,
                metrics_actor=self.metrics_actor, total_steps=config.train.steps,
                flops_per_token=training_flops_per_token(model_args(config)),
                peak_flops_per_device=self.peak_flops_per_device(), retry_s=config.data_read_retry_s,
            )

    def peak_flops_per_device(self) -> float | None:
        """Return the MFU denominator: metrics.peak_flops_per_device, else the GPU's table entry, else None."""
        configured = self.config.metrics.peak_flops_per_device
        if configured is not None or self.context.device.type != "cuda":
            return configured
        name, peak = current_device_peak(self.context.local_rank)
        if peak is None:
            self.log(logging.WARNING, "no peak FLOP/s known for %s; set metrics.peak_flops_per_device to report MFU", name)
            return None
        return peak.flops

    def log(self, level: int, message: str, *args: Any) -> None:
        """Log from rank 0 with the run and attempt in front."""
        if self.is_rank0:
            logger.log(level, "run=%s attempt=%d " + message, self.config.run.name, self.attempt, *args)

    def find_metrics_actor(self, name: str | None) -> Any | None:
        if not name:
            return None
        try:
            return ray.get_actor(name)
        except ValueError:
            logger.warning("metrics actor %s not found; metrics are not exported", name)
            return None

    def refuse_if_aborted(self) -> None:
        marker = join(self.run_uri, ABORT_FILE)
        if with_retries(lambda: self.fs.exists(marker), description=f"checking {marker}", budget_s=self.config.data_read_retry_s,
                        setting="data.read_retry_s"):
            reason = read_json(self.fs, marker).get("reason", "")
            raise SpikeAbort(f"run {self.config.run.name} was aborted earlier: {reason}. Delete {marker} to resume it")

    # Hangs, stragglers and stop requests.

    def record_hang(self, reason: str, details: dict[str, Any]) -> None:
        """Log a hang and record it in storage and metrics (the restart cause)."""
        logger.error("%s", reason)
        path = join(self.run_uri, HANGS_DIR, f"attempt-{self.attempt:04d}-rank-{self.context.world_rank:05d}.json")
        try:
            write_json(self.fs, path, {"attempt": self.attempt, "rank": self.context.world_rank,
                                       "step": self.current_step + 1, "detected_at": time.time(), **details})
        except OSError as error:  # the restart matters more than the record
            logger.warning("could not record the hang in storage: %s", error)
        if self.metrics_actor is not None:
            self.metrics_actor.record_hang.remote()

    def on_hang(self, stalled_s: float, timeout_s: float) -> None:
        """Called by the watchdog thread: record the hang, then end this rank."""
        reason = (f"run={self.config.run.name} attempt={self.attempt} rank={self.context.world_rank} "
                  f"step={self.current_step + 1} hang detected by the watchdog: no step completed for "
                  f"{stalled_s:.0f} s (timeout {timeout_s:.0f} s)")
        self.record_hang(reason, {"stalled_s": stalled_s, "timeout_s": timeout_s, "detector": "watchdog"})
        kill_this_process(reason)

    def record_rank_process(self) -> None:
        """Write this rank's process id and Ray node to storage, for operators and tests that signal one rank."""
        write_json(self.fs, rank_process_file(self.run_uri, self.attempt, self.context.world_rank), {
            "attempt": self.attempt, "rank": self.context.world_rank, "world_size": self.context.world_size,
            "pid": os.getpid(), "hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": self.started_at,
        })

    def stop_flags(self) -> list[float]:
        """Return this rank's flags for the step's collective: [driver stop requested, SIGTERM received]."""
        return [float(self.stop_requested.is_set()), float(sigterm_received())]

    def agree_on_stop(self, summed_flags: list[float]) -> None:
        """Decide whether to stop after this step from the flags of ``stop_flags`` summed over ranks, as every rank does."""
        self.driver_stop_agreed = summed_flags[0] > 0
        self.preempted_ranks = int(summed_flags[1])
        self.stop_agreed = self.driver_stop_agreed or self.preempted_ranks > 0
        if self.driver_stop_agreed:
            self.stop_requested.set()

    def poll_stop_requests(self) -> None:
        """Rank 0 thread: watch the driver's stop flag (set on SIGTERM) without blocking the step loop."""
        while not self.stop_requested.is_set():
            try:
                if ray.get(self.metrics_actor.stop_requested.remote(), timeout=30):
                    self.stop_requested.set()
                    return
            except (ray.exceptions.RayError, TimeoutError):
                return  # the driver is gone; Ray Train ends this attempt anyway
            time.sleep(STOP_POLL_INTERVAL_S)

    def check_stragglers(self) -> None:
        """Gather each rank's mean busy time over the interval; flag ranks that stay well above the median.

        A rank that had its data ready before the slowest rank waits for it in forward's first
        collective (FSDP's all-gather, or DDP's first gradient all-reduce). That wait is the
        difference of the two ranks' preparation times, and it is taken out of the busy time here.
        """
        local = torch.tensor([statistics.fmean(times) if times else 0.0 for times in (self.busy_times_s, self.prep_times_s)],
                             dtype=torch.float64)
        self.busy_times_s, self.prep_times_s = [], []
        gathered = [torch.zeros_like(local) for _ in range(self.context.world_size)]
        dist.all_gather(gathered, local)
        if not self.is_rank0:
            return
        slowest_prep_s = max(float(item[1]) for item in gathered)
        busy = [max(0.0, float(item[0]) - (slowest_prep_s - float(item[1]))) for item in gathered]
        median = statistics.median(busy)
        factor = self.config.fault_tolerance.straggler_factor
        flagged = []
        for rank, seconds in enumerate(busy):
            slow = median > 0 and seconds > factor * median
            self.slow_intervals[rank] = self.slow_intervals.get(rank, 0) + 1 if slow else 0
            if self.slow_intervals[rank] >= self.config.fault_tolerance.straggler_intervals:
                flagged.append(rank)
                self.log(logging.WARNING, "step=%d straggler: rank %d busy %.3f s per step, median %.3f s (factor %.1f)",
                         self.current_step, rank, seconds, median, factor)
        if self.metrics_actor is not None:
            self.metrics_actor.record_rank_times.remote(busy, flagged)

    # Resume and rollback.

    def load(self, checkpoint_id: str) -> None:
        load_started = time.monotonic()
        self.train_state = load_checkpoint(
            checkpoint_id, model=self.model, optimizer=self.optimizer, world_rank=self.context.world_rank,
            world_size=self.context.world_size, seed=self.config.run.seed, storage_options=self.storage_options,
        )
        self.monitor.load_state_dict(self.train_state.stability)
        if self.loss_scaler is not None and self.train_state.loss_scaler:
            self.loss_scaler.load_state_dict(self.train_state.loss_scaler)
        # The run-level record also contains skips decided after this checkpoint was saved.
        self.data_skips = DataSkips([tuple(item) for item in self.train_state.data_skips] + self.read_run_skips())
        load_s = time.monotonic() - load_started
        self.log(logging.INFO, "loaded %s (step %d) in %.2f s", checkpoint_id, self.train_state.step, load_s)
        if self.is_rank0 and self.metrics_actor is not None:
            loaded_bytes = read_commit_record(self.fs, checkpoint_id).total_bytes
            self.metrics_actor.record_checkpoint_load.remote(load_s, loaded_bytes)

    def resume(self) -> None:
        # A checkpoint that fails verification is logged and skipped for the one before it.
        if load_newest_valid(committed_newest_first(self.fs, self.run_uri), self.load,
                             world_rank=self.context.world_rank) is not None:
            return
        seed_rank_rng(self.config.run.seed, 0, self.context.world_rank, self.context.world_size)
        self.data_skips = DataSkips(self.read_run_skips())
        self.log(logging.INFO, "starting from scratch with %d ranks", self.context.world_size)

    def read_run_skips(self) -> list[tuple[int, int]]:
        path = join(self.run_uri, DATA_SKIPS_FILE)
        if not self.fs.exists(path):
            return []
        return [(int(start), int(length)) for start, length in read_json(self.fs, path)["ranges"]]

    def rollback(self, spike_step: int) -> bool:
        """Reload the newest committed checkpoint before ``spike_step`` and skip a window of batches.

        Return False (and change nothing) when no such checkpoint exists.
        """
        # A background save may be about to commit the checkpoint this rollback needs.
        self.checkpointer.wait()
        candidates = committed_newest_first(self.fs, self.run_uri, before_step=spike_step)
        if not candidates:
            self.log(logging.WARNING, "step=%d rollback impossible: no committed checkpoint before it; skipping the step instead",
                     spike_step)
            return False
        target = candidates[0]
        first_batch = self.data_skips.batch_for_step(target.step + 1)
        spike_batch = self.data_skips.batch_for_step(spike_step)
        count = max(self.config.stability.rollback_skip_batches, spike_batch - first_batch + 1)
        skips = DataSkips(self.data_skips.ranges)
        skips.add(first_batch, count)
        if self.is_rank0:
            write_json(self.fs, join(self.run_uri, DATA_SKIPS_FILE), {"ranges": skips.to_list()})
        dist.barrier()
        target, _ = load_newest_valid(candidates, self.load, world_rank=self.context.world_rank)
        self.data_skips = DataSkips(self.read_run_skips())
        self.log(logging.WARNING, "step=%d rolled back to step %d; skipping batches %d..%d (samples %d..%d of the order)",
                 spike_step, target.step, first_batch, first_batch + count - 1,
                 (first_batch - 1) * self.config.train.global_batch, (first_batch + count - 1) * self.config.train.global_batch - 1)
        return True

    # One step.

    def rank_chunks(self, step: int) -> list[list[int]]:
        """Return this rank's sample indices of ``step``, one list per micro-batch."""
        config = self.config
        batch_id = self.data_skips.batch_for_step(step)
        indices = self.order.global_batch(batch_id, config.train.global_batch)
        # Ranks of one tensor-parallel group share a data shard.
        return rank_micro_batches(indices, self.parallel.dp_rank, self.parallel.dp_size, config.train.micro_batch)

    def micro_batches(self, step: int) -> list:
        config = self.config
        batches = self.prefetcher.load(self.rank_chunks(step))
        if step < config.train.steps:
            self.prefetcher.prefetch(self.rank_chunks(step + 1))
        if config.run.record_samples:
            self.step_samples = self.gather_samples(batches)
        return batches

    def gather_samples(self, batches: list) -> list[int]:
        """Test mode: collect the sample indices each rank really trains on this step (rank 0 keeps them)."""
        local = torch.tensor([index for batch in batches for index in batch.sample_indices], dtype=torch.int64)
        gathered = [torch.zeros_like(local) for _ in range(self.context.world_size)]
        dist.all_gather(gathered, local)
        return sorted(int(index) for tensor in gathered for index in tensor.tolist())

    def learning_rate(self, step: int) -> float:
        schedule = self.config.schedule
        return self.config.optim.lr * lr_multiplier(
            schedule.name, step, warmup_steps=schedule.warmup_steps, total_steps=self.config.train.steps,
            min_ratio=schedule.min_lr_ratio, decay_ratio=schedule.decay_ratio, decay_shape=schedule.decay_shape,
        )

    def log_events(self, events: list[StabilityEvent]) -> None:
        for event in events:
            self.log(logging.WARNING, "rank=%d step=%d %s detected: value=%.6g threshold=%.6g action=%s",
                     self.context.world_rank, event.step, event.detector, event.value, event.threshold, event.action)

    def run_step(self, step: int) -> tuple[str, float, float, int, list[StabilityEvent]]:
        """Compute one step and apply the stability decision; return (action, loss, grad norm, tokens, events)."""
        config = self.config
        started = time.perf_counter()
        fire_kill_faults(config, self.run_uri, self.storage_options, step, self.context.world_rank)
        fire_remove_node_faults(config, self.run_uri, self.storage_options, step, self.context.world_rank)
        fire_hang_faults(config, self.run_uri, self.storage_options, step, self.context.world_rank)
        delay_s = slow_fault_delay_s(config, step, self.context.world_rank)
        if delay_s:
            time.sleep(delay_s)
        multiplier = spike_multiplier(config, self.run_uri, self.storage_options, step, self.context.world_rank)
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        timings: dict[str, Any] = {}
        batches = self.micro_batches(step)
        self.prep_times_s.append(time.perf_counter() - started)
        gradients = compute_gradients(self.model, batches, device=self.context.device,
                                      fsdp_units=self.fsdp_units, loss_multiplier=multiplier, loss_scale=scale,
                                      flags=self.stop_flags(), timings=timings,
                                      sample_replicas=self.parallel.tp_size)
        # Any rank's stop request or SIGTERM reaches every rank through the collective of the step's loss sum.
        self.agree_on_stop(gradients.flags)
        # Busy time leaves out the wait in that collective. check_stragglers also removes the wait in
        # forward's first collective for ranks that were ready before the slowest one.
        self.busy_times_s.append(time.perf_counter() - started - timings["sync_wait_s"])

        if self.loss_scaler is not None and not math.isfinite(gradients.grad_norm) and math.isfinite(gradients.loss):
            # A float16 overflow: lower the scale and skip, counted apart from spikes.
            self.loss_scaler.update(overflow=True)
            self.optimizer.zero_grad(set_to_none=True)
            event = StabilityEvent("overflow", "skip", step, gradients.grad_norm, math.inf)
            self.log(logging.INFO, "step=%d float16 overflow: skipped, loss scale lowered to %g", step, self.loss_scaler.scale)
            return "overflow", gradients.loss, gradients.grad_norm, gradients.target_tokens, [event]

        decision = self.monitor.check(step, gradients.loss, gradients.grad_norm)
        self.log_events(decision.events)
        if decision.action == "step":
            apply_update(self.model, self.optimizer, gradients, lr=self.learning_rate(step),
                         grad_clip=config.train.grad_clip, loss_scale=scale)
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow=False)
        self.optimizer.zero_grad(set_to_none=True)
        return decision.action, gradients.loss, gradients.grad_norm, gradients.target_tokens, decision.events

    def save(self, step: int, loss: float, reason: str = "interval") -> None:
        """Save a checkpoint of ``step``; a collective that every rank calls at the same step.

        The write goes on in the background; reasons "final", "sigterm" and "preemption" return only
        after the checkpoint committed (see workers.async_save.Checkpointer.save).
        """
        self.train_state.stability = self.monitor.state_dict()
        self.train_state.data_skips = self.data_skips.to_list()
        self.train_state.loss_scaler = self.loss_scaler.state_dict() if self.loss_scaler is not None else None
        with self.watchdog.paused():
            stall_s = self.checkpointer.save(step, self.train_state, loss=loss, reason=reason)
        self.last_saved_step = step
        if self.reporter is not None:
            self.reporter.checkpoint_stalled(step, stall_s)

    def on_checkpoint_committed(self, outcome: SaveOutcome, stall_s: float) -> None:
        """Report a committed checkpoint; the checkpointer calls this on every rank at the same step."""
        if self.reporter is not None:
            self.reporter.checkpoint_saved(outcome.step, outcome.duration_s)

    def abort(self, error: SpikeAbort, step: int) -> None:
        if self.is_rank0:
            write_json(self.fs, join(self.run_uri, ABORT_FILE), {"step": step, "reason": str(error), "aborted_at": time.time()})
        self.log(logging.ERROR, "step=%d aborting: %s", step, error)

    def train(self) -> None:
        config = self.config
        self.resume()
        self.last_saved_step = self.train_state.step
        self.watchdog.start()
        if self.is_rank0 and self.metrics_actor is not None:
            threading.Thread(target=self.poll_stop_requests, name="stalwart-stop-poller", daemon=True).start()
        step = self.train_state.step
        try:
            while step < config.train.steps:
                step = self.train_one(step + 1)
                # The agreed flag, not the live one: rank 0's poller may set the live flag
                # after this step's collective, and every rank must stop at the same step.
                if self.stop_agreed:
                    self.stop(step)
                    return
        finally:
            self.watchdog.stop()
            self.prefetcher.close()

        self.checkpointer.close()
        self.sigterm_watcher.stop()
        report_end_to_ray(self.train_state.step, self.train_state.tokens_seen)

    def train_one(self, step: int) -> int:
        """Run step ``step`` with its bookkeeping; return the step the loop has reached (lower after a rollback)."""
        config = self.config
        self.current_step = step - 1
        started = time.perf_counter()
        try:
            action, loss, grad_norm, tokens, events = self.run_step(step)
        except SpikeAbort as error:
            self.abort(error, step)
            raise
        except RuntimeError as error:
            # gloo and NCCL report a collective past the process-group timeout this way.
            if "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower():
                self.record_hang(
                    f"run={config.run.name} attempt={self.attempt} rank={self.context.world_rank} step={step} "
                    f"hang detected: a collective timed out after {config.fault_tolerance.collective_timeout_s:.0f} s",
                    {"detector": "collective_timeout", "error": str(error)[:500]},
                )
            raise
        duration_s = time.perf_counter() - started
        self.watchdog.step_done(duration_s)

        if action == "rollback":
            with self.watchdog.paused():
                rolled_back = self.rollback(step)
            if rolled_back:
                if self.reporter is not None:
                    self.reporter.add(self.record(step, loss, grad_norm, tokens, "rollback", events, duration_s))
                    self.reporter.flush()
                return self.train_state.step

        self.train_state.step = step
        self.current_step = step
        self.train_state.tokens_seen += tokens
        self.train_state.skipped_steps += int(action in ("skip", "rollback"))
        self.train_state.overflow_steps += int(action == "overflow")
        record = self.record(step, loss, grad_norm, tokens, action, events, duration_s)
        if self.reporter is not None:
            self.reporter.add(record)

        reason = self.checkpointer.due(step)
        if self.reporter is not None:
            # A wait here for a save past checkpoint.max_inflight_steps is checkpoint stall too.
            self.reporter.checkpoint_stalled(step, self.checkpointer.due_blocked_s)
        if reason is not None:
            self.save(step, loss, reason=reason)

        if step % config.train.log_every == 0 or step == config.train.steps:
            self.check_stragglers()
            if self.preemption_imminent() and self.last_saved_step != step:
                self.log(logging.WARNING, "step=%d a node of this worker group is being preempted: saving now", step)
                self.save(step, loss, reason="preemption")
            if self.reporter is not None:
                self.reporter.flush()
        return step

    def preemption_imminent(self) -> bool:
        """Ask Ray Train whether a node of this group is being drained (spot reclaim, scale-down)."""
        return ray.train.get_preemption_info() is not None

    def stop(self, step: int) -> None:
        """End the attempt at ``step``, which every rank agreed on, once a checkpoint of it has committed.

        A stop the driver requested returns cleanly. A stop for SIGTERM to a worker raises
        ``WorkerPreempted`` after the commit, so that Ray Train restarts the worker group and
        the run resumes at the next step. At the last step it returns, because the run is done.
        """
        preempted = self.preempted_ranks > 0 and not self.driver_stop_agreed
        reason = "preemption" if preempted else "sigterm"
        cause = (f"{self.preempted_ranks} rank(s) received SIGTERM" if preempted
                 else "stop requested (SIGTERM to the driver)")
        if self.newest_commit_is(step):
            self.log(logging.WARNING, "step=%d %s; the newest committed checkpoint is this step", step, cause)
        else:
            self.log(logging.WARNING, "step=%d %s: saving a checkpoint", step, cause)
            self.save(step, self.reporter.last_loss if self.reporter is not None else float("nan"), reason=reason)
        if self.reporter is not None:
            self.reporter.flush()
        self.checkpointer.close()
        if preempted and step < self.config.train.steps:
            self.record_preemption()
            raise WorkerPreempted(
                f"run={self.config.run.name} attempt={self.attempt} rank={self.context.world_rank}: {cause}, and the "
                f"checkpoint of step {step} has committed. Ray Train restarts the worker group and the run resumes "
                f"at step {step + 1}. Each such restart counts against run.max_failures={self.config.run.max_failures}"
            )
        self.sigterm_watcher.stop()
        report_end_to_ray(step, self.train_state.tokens_seen, stopped=step < self.config.train.steps)

    def newest_commit_is(self, step: int) -> bool:
        """Wait for a save in flight, then return whether the newest committed checkpoint is the one of ``step``."""
        self.checkpointer.wait()
        outcome = self.checkpointer.last_outcome
        return outcome is not None and outcome.step == step and outcome.committed

    def record_preemption(self) -> None:
        """On rank 0, mark the coming restart as caused by preemption, waiting until the metrics actor has it."""
        if not self.is_rank0 or self.metrics_actor is None:
            return
        try:
            ray.get(self.metrics_actor.record_preemption.remote(), timeout=PREEMPTION_RECORD_TIMEOUT_S)
        except ray.exceptions.RayError as error:
            logger.warning("run=%s attempt=%d failed to record the preemption in the metrics: %r",
                           self.config.run.name, self.attempt, error)

    def record(self, step: int, loss: float, grad_norm: float, tokens: int, action: str,
               events: list[StabilityEvent], duration_s: float) -> StepRecord:
        return StepRecord(step=step, loss=loss, grad_norm=grad_norm, lr=self.learning_rate(step), tokens=tokens,
                          skipped=action != "step", action=action, events=[event.to_dict() for event in events],
                          attempt=self.attempt, world_size=self.context.world_size, time=time.time(),
                          duration_s=duration_s, samples=self.step_samples)


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: set up, resume if possible, train to ``train.steps``."""
    configure_worker_logging()
    install_in_worker_process()
    Trainer(loop_config).train()
