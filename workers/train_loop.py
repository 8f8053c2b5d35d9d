"""The per-worker training function that Ray Train runs on every rank.

A run resumes from the newest committed checkpoint in storage whenever one
exists, whether this is a fresh driver or Ray Train's restart after a worker
failure: storage, not the Ray cluster's memory, is the source of truth.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from service.catalog import checkpoint_uri, latest_committed
from service.config import Config
from service.storage import filesystem, join, write_json
from workers.checkpoint import TrainState, load_checkpoint, save_checkpoint, seed_rank_rng
from workers.data import SampleOrder, TokenDataset, rank_micro_batches
from workers.model import ModelArgs, build_model
from workers.parallel import apply_fsdp
from workers.reporting import ProgressReporter, StepRecord
from workers.schedule import lr_multiplier
from workers.step import train_step

logger = logging.getLogger(__name__)

ATTEMPTS_DIR = "attempts"
FAULTS_DIR = "faults"


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


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    decay = [param for param in model.parameters() if param.ndim >= 2]
    no_decay = [param for param in model.parameters() if param.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps, foreach=True)


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


def fire_faults(config: Config, run_uri: str, storage_options: dict[str, Any], step: int, context: WorkerContext) -> None:
    """Kill this rank with SIGKILL if a fault is due here; each fault fires once per run.

    The marker in storage is written before the kill, so the restarted attempt
    does not fire the same fault again.
    """
    for fault in config.faults:
        if fault.kind != "kill" or fault.rank != context.world_rank or fault.step != step:
            continue
        fs = filesystem(run_uri, storage_options)
        marker = join(run_uri, FAULTS_DIR, f"kill-rank{fault.rank}-step{fault.step}.json")
        if fs.exists(marker):
            continue
        write_json(fs, marker, {"kind": "kill", "rank": fault.rank, "step": fault.step, "fired_at": time.time()})
        logger.warning("fault injection: killing rank %d (pid %d) with SIGKILL at step %d", context.world_rank, os.getpid(), step)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def report_checkpoint_to_ray(step: int, checkpoint_id: str, metrics: dict[str, Any]) -> None:
    """Tell Ray Train about a committed checkpoint that already lies under the run's storage path."""
    storage = ray.train.get_context().get_storage()
    relative = checkpoint_id.rsplit("/checkpoints/", 1)[-1]
    path = join(storage.experiment_fs_path, "checkpoints", relative)
    checkpoint = ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)
    ray.train.report(
        {**metrics, "step": step},
        checkpoint=checkpoint,
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
    )


def train_func(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: set up, resume if possible, train to ``train.steps``."""
    configure_worker_logging()
    started_at = time.time()
    config = Config.model_validate(loop_config["config"])
    run_uri: str = loop_config["run_uri"]
    dataset_uri: str = loop_config["dataset_uri"]
    storage_options: dict[str, Any] = config.storage.options
    saved_config: dict[str, Any] = loop_config["saved_config"]

    ray_context = ray.train.get_context()
    use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
    local_rank = ray_context.get_local_rank()
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    else:
        # One thread per CPU Ray gave this worker, so ranks do not oversubscribe cores.
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    context = WorkerContext(ray_context.get_world_rank(), ray_context.get_world_size(), local_rank, device)
    mesh = init_device_mesh(device.type, (context.world_size,))

    attempt = next_attempt(run_uri, storage_options, context, started_at)
    metrics_actor = None
    if loop_config.get("metrics_actor"):
        try:
            metrics_actor = ray.get_actor(loop_config["metrics_actor"])
        except ValueError:
            logger.warning("metrics actor %s not found; metrics are not exported", loop_config["metrics_actor"])
    if metrics_actor is not None and context.world_rank == 0:
        metrics_actor.record_attempt.remote(attempt, context.world_size)

    # Model and optimizer: identical init on every rank from the seed, then sharded.
    model = build_model(model_args(config), seed=config.run.seed)
    model.to(device)
    fsdp_units = apply_fsdp(model, mesh, param_dtype=config.parallel.param_dtype, reduce_dtype=config.parallel.reduce_dtype)
    optimizer = build_optimizer(model, config)

    # Resume from the newest committed checkpoint, if any.
    train_state = TrainState()
    latest = latest_committed(filesystem(run_uri, storage_options), run_uri)
    if latest is not None:
        load_started = time.monotonic()
        train_state = load_checkpoint(
            latest.checkpoint_id, model=model, optimizer=optimizer, world_rank=context.world_rank,
            world_size=context.world_size, seed=config.run.seed, storage_options=storage_options,
        )
        if context.world_rank == 0:
            logger.info("run=%s attempt=%d resumed from %s (step %d) in %.2f s", config.run.name, attempt,
                        latest.checkpoint_id, train_state.step, time.monotonic() - load_started)
    else:
        seed_rank_rng(config.run.seed, 0, context.world_rank, context.world_size)
        if context.world_rank == 0:
            logger.info("run=%s attempt=%d starting from scratch with %d ranks", config.run.name, attempt, context.world_size)

    dataset = TokenDataset(dataset_uri, config.model.seq_len, storage_options)
    order = SampleOrder(dataset.num_samples, config.run.seed)
    reporter = None
    if context.world_rank == 0:
        reporter = ProgressReporter(
            run_name=config.run.name, run_uri=run_uri, attempt=attempt, world_size=context.world_size,
            storage_options=storage_options, metrics_actor=metrics_actor, total_steps=config.train.steps,
        )

    last_saved_step = train_state.step
    for step in range(train_state.step + 1, config.train.steps + 1):
        fire_faults(config, run_uri, storage_options, step, context)

        # Data: the global batch of this step, this rank's slice of it.
        indices = order.global_batch(step, config.train.global_batch)
        micro_batches = [
            dataset.micro_batch(chunk)
            for chunk in rank_micro_batches(indices, context.world_rank, context.world_size, config.train.micro_batch)
        ]

        # Optimizer step at the LR the schedule gives for this step.
        lr = config.optim.lr * lr_multiplier(
            config.schedule.name, step, warmup_steps=config.schedule.warmup_steps,
            total_steps=config.train.steps, min_ratio=config.schedule.min_lr_ratio,
        )
        result = train_step(model, optimizer, micro_batches, lr=lr, grad_clip=config.train.grad_clip,
                            device=device, fsdp_units=fsdp_units)
        train_state.step = step
        train_state.tokens_seen += result.target_tokens
        train_state.skipped_steps += int(result.skipped)
        if result.skipped and context.world_rank == 0:
            logger.warning("run=%s attempt=%d step=%d skipped: loss=%s grad_norm=%s is not finite",
                           config.run.name, attempt, step, result.loss, result.grad_norm)

        # Reporting.
        if reporter is not None:
            reporter.add(StepRecord(step=step, loss=result.loss, grad_norm=result.grad_norm, lr=lr,
                                    tokens=result.target_tokens, skipped=result.skipped, attempt=attempt,
                                    world_size=context.world_size, time=time.time()))
            if step % config.train.log_every == 0 or step == config.train.steps:
                reporter.flush()

        # Checkpoint.
        every = config.checkpoint.every_steps
        due = (every is not None and step % every == 0) or (config.checkpoint.save_final and step == config.train.steps)
        if due:
            checkpoint_id = checkpoint_uri(run_uri, step)
            save_seconds = save_checkpoint(
                checkpoint_id, model=model, optimizer=optimizer, train_state=train_state, run_uri=run_uri,
                config=saved_config, world_rank=context.world_rank, world_size=context.world_size,
                storage_options=storage_options, keep_last=config.checkpoint.keep_last,
                extra={"loss": result.loss, "attempt": attempt},
            )
            last_saved_step = step
            if reporter is not None:
                reporter.checkpoint_saved(step, save_seconds)
            report_checkpoint_to_ray(step, checkpoint_id, {"loss": result.loss, "tokens_seen": train_state.tokens_seen})

    if last_saved_step != config.train.steps:
        # Tell Ray Train the run finished even when the last step was not saved.
        ray.train.report({"step": train_state.step, "tokens_seen": train_state.tokens_seen})
