"""Driver: checks the config against the world, prepares data, launches Ray Train, prints a summary."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from service.catalog import list_checkpoints
from service.config import Config, ConfigError, redact_secrets
from service.goodput import PARTS as GOODPUT_PARTS
from service.metrics import MetricsActor, metrics_actor_name
from service.prepare import prepare_dataset
from service.tracking import wandb_installed
from service.storage import absolute_uri, filesystem, is_local, join, read_json
from workers.reporting import final_losses, read_history
from workers.train_loop import ABORT_FILE, train_func

logger = logging.getLogger(__name__)

# Exit status of a run stopped by SIGTERM before its last step (128 + SIGTERM, the shell convention).
EXIT_STOPPED = 143
# Upper bound on closing the W&B run at the end (an online run uploads what is left).
TRACKING_FINISH_TIMEOUT_S = 300

# Non-secret storage settings the driver passes to the training workers. Credentials are never
# passed: Ray stores a runtime_env in its cluster metadata, where the dashboard and the state API
# show it. Workers read credentials from their own node's environment (the embedded cluster's
# processes inherit the driver's; on Kubernetes, a Secret mounted as environment variables).
WORKER_ENV_KEYS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class RunSummary:
    run_name: str
    run_uri: str
    steps: int
    tokens: int
    wall_s: float
    first_loss: float | None
    last_loss: float | None
    restarts: int
    skipped_steps: int
    committed_steps: list[int]
    events: list[dict[str, Any]]
    goodput: dict[str, float]
    stopped: bool  # ended early on a stop request; the same command resumes it
    mfu: float | None = None  # mean MFU over logging intervals; None without a peak FLOP/s
    # Steps run by this command (recomputed ones included) and their tokens; less than the run's
    # totals when the command resumed a run.
    session_steps: int = 0
    session_tokens: int = 0

    def lines(self) -> list[str]:
        rate = self.session_tokens / self.wall_s if self.wall_s > 0 else 0.0
        loss = "n/a" if self.first_loss is None else f"{self.first_loss:.3f} -> {self.last_loss:.3f}"
        committed = ", ".join(str(step) for step in self.committed_steps) or "none"
        mfu = "n/a (no peak FLOP/s known: set metrics.peak_flops_per_device)" if self.mfu is None else f"{self.mfu:.2%}"
        ran = (f" in {self.wall_s:.0f} s" if self.session_steps == self.steps
               else f"; this command ran {self.session_steps} steps in {self.wall_s:.0f} s")
        return [
            f"run {self.run_name}: {self.steps} steps, {self.tokens:,} tokens{ran} ({rate:,.0f} tokens/s)",
            f"  loss {loss}; restarts {self.restarts} in this command; skipped steps {self.skipped_steps}",
            "  goodput {:.1%}: ".format(self.goodput.get("productive", 0.0) / max(self.goodput.get("total", 0.0), 1e-9))
            + ", ".join(f"{part} {self.goodput.get(part, 0.0):.1f} s" for part in GOODPUT_PARTS),
            f"  MFU {mfu}",
            f"  committed checkpoints at steps: {committed}",
            f"  stability events: {len(self.events) or 'none'}",
            *(
                f"    step {event['step']}: {event['detector']} value={event['value']:.4g} "
                f"threshold={event['threshold']:.4g} action={event['action']}"
                for event in self.events[:20]
            ),
            f"  storage: {self.run_uri}",
            *(["  stopped early on request; run the same command to resume"] if self.stopped else []),
        ]


def run_uri_of(config: Config) -> str:
    return join(absolute_uri(config.storage.uri), config.run.name)


def check_against_dataset(config: Config, dataset_uri: str) -> None:
    """Reject settings the prepared data cannot serve, before any worker starts."""
    manifest = read_json(filesystem(dataset_uri, config.storage.options), join(dataset_uri, "manifest.json"))
    if config.model.vocab_size < manifest["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's vocabulary of "
            f"{manifest['vocab_size']}; set model.vocab_size to at least {manifest['vocab_size']}"
        )
    if manifest["num_tokens"] < config.model.seq_len + 1:
        raise ConfigError(
            f"model.seq_len={config.model.seq_len} needs at least {config.model.seq_len + 1} tokens, but the data has "
            f"{manifest['num_tokens']}; lower model.seq_len or add data"
        )


def check_against_cluster(config: Config, local_cluster: bool) -> None:
    """On the embedded cluster, fail fast instead of waiting forever for CPUs that will never come."""
    if not local_cluster:
        return
    available = ray.cluster_resources().get("CPU", 0)
    needed = config.scaling.min_workers * config.scaling.cpus_per_worker
    if needed > available:
        raise ConfigError(
            f"scaling.num_workers (minimum {config.scaling.min_workers}) x scaling.cpus_per_worker = {needed:g} CPUs, "
            f"but the local Ray cluster has {available:g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )


def ray_storage(config: Config) -> tuple[str, Any]:
    """Return (storage_path, storage_filesystem) for Ray Train, sharing the run's fsspec settings."""
    root = absolute_uri(config.storage.uri)
    if is_local(root):
        os.makedirs(root, exist_ok=True)
        return root, None
    import pyarrow.fs as pafs

    fs = filesystem(root, config.storage.options)
    return fs._strip_protocol(root), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def start_ray(address: str | None) -> bool:
    """Connect to a cluster at ``address`` or start an embedded one bound to 127.0.0.1; return True when embedded."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # NOTE: the loopback binding comes from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
    # the CLI sets before Ray is imported; ray.init cannot change it afterwards.
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    # address="local" always starts a new cluster: without it, ray.init() joins the latest
    # cluster that `ray start` left on this machine, even a dead one.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    return True


def start_metrics(config: Config) -> Any:
    """Start the run's actor on this node: it serves metrics (when enabled), logs to W&B and carries stop requests."""
    wandb_settings = None
    if config.wandb.enabled:
        if not wandb_installed():
            raise ConfigError("wandb.enabled=true needs the wandb package; run pip install 'stalwart[tracking]' "
                              "or set wandb.enabled=false")
        # The actor runs on this node, so a relative folder is resolved against the driver's folder.
        wandb_settings = {**config.wandb.model_dump(), "dir": os.path.abspath(config.wandb.dir or ".")}
    actor = MetricsActor.options(
        name=metrics_actor_name(config.run.name),
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(config.run.name, config.metrics.host, config.metrics.port, serve=config.metrics.enabled,
             wandb_settings=wandb_settings, run_config=redact_secrets(config.model_dump(mode="json")))
    host, port = ray.get(actor.address.remote())
    if port is not None:
        logger.info("metrics at http://%s:%d/metrics", host, port)
    return actor


@contextlib.contextmanager
def stop_on_sigterm(config: Config, metrics_actor: Any) -> Iterator[None]:
    """On SIGTERM, ask the workers to save and stop; exit anyway after ``fault_tolerance.stop_grace_s``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        grace_s = config.fault_tolerance.stop_grace_s
        logger.warning("SIGTERM: asking the workers to save a checkpoint and stop (grace %.0f s)", grace_s)
        metrics_actor.request_stop.remote()

        def give_up() -> None:
            logger.error("workers did not stop within fault_tolerance.stop_grace_s=%.0f s; exiting", grace_s)
            os._exit(EXIT_STOPPED)

        timer = threading.Timer(grace_s, give_up)
        timer.daemon = True
        timer.start()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summarize(config: Config, run_uri: str, wall_s: float, restarts: int, goodput: dict[str, float],
              started_at: float = 0.0) -> RunSummary:
    """Summarize the run from its history; ``started_at`` (wall clock) is when this command started."""
    records = read_history(run_uri, config.storage.options)
    this_command = [record for record in records if record.get("time", 0.0) >= started_at]
    losses = final_losses(records)
    steps = sorted(losses)
    latest_by_step = {record["step"]: record for record in records}
    committed = [info.step for info in list_checkpoints(filesystem(run_uri, config.storage.options), run_uri) if info.usable]
    return RunSummary(
        run_name=config.run.name,
        run_uri=run_uri,
        steps=steps[-1] if steps else 0,
        tokens=sum(record["tokens"] for record in latest_by_step.values()),
        wall_s=wall_s,
        first_loss=losses[steps[0]] if steps else None,
        last_loss=losses[steps[-1]] if steps else None,
        restarts=restarts,
        skipped_steps=sum(record["skipped"] for record in latest_by_step.values()),
        committed_steps=committed,
        events=[event for record in records for event in record.get("events", [])],
        goodput=goodput,
        stopped=(steps[-1] if steps else 0) < config.train.steps,
        session_steps=len(this_command),
        session_tokens=sum(record["tokens"] for record in this_command),
    )


# Values this process exported for Ray Train, by variable, so a later run in the same process
# can tell its own earlier value from one the user set.
_exported_settings: dict[str, str] = {}


def export_controller_setting(name: str, value: float) -> None:
    """Set a Ray Train environment variable to the config's value, unless the user set it (their value wins)."""
    current = os.environ.get(name)
    if current is not None and current != _exported_settings.get(name):
        logger.info("%s=%s from the environment overrides the config's %s", name, current, value)
        return
    os.environ[name] = _exported_settings[name] = str(value)


def build_trainer(config: Config, run_uri: str, dataset_uri: str, metrics_actor_id: str | None) -> TorchTrainer:
    storage_path, storage_filesystem = ray_storage(config)
    # Read by the Ray Train controller: how long a worker group may take to start before Ray
    # retries (and, for an elastic run, retries smaller), and how often it polls the workers,
    # which bounds how late a dead worker is noticed.
    export_controller_setting("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", config.scaling.worker_group_start_timeout_s)
    export_controller_setting("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", config.scaling.health_check_interval_s)
    loop_config = {
        "config": config.model_dump(mode="json"),
        "saved_config": redact_secrets(config.model_dump(mode="json")),
        "run_uri": run_uri,
        "dataset_uri": dataset_uri,
        "metrics_actor": metrics_actor_id,
    }
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        # Collectives time out no later than the hang watchdog fires.
        torch_config=TorchConfig(
            backend="nccl" if config.scaling.use_gpu else "gloo",
            timeout_s=int(math.ceil(config.fault_tolerance.collective_timeout_s)),
        ),
        scaling_config=ScalingConfig(
            num_workers=(config.scaling.min_workers, config.scaling.max_workers) if config.scaling.elastic
            else config.scaling.max_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=config.scaling.resize_check_interval_s,
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            # Stalwart keeps and prunes its own checkpoints; Ray must not delete any.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": {key: os.environ[key] for key in WORKER_ENV_KEYS if key in os.environ}},
        ),
    )


def check_not_aborted(config: Config, run_uri: str) -> None:
    """Refuse to restart a run that the stability logic aborted, before any worker starts."""
    fs = filesystem(run_uri, config.storage.options)
    marker = join(run_uri, ABORT_FILE)
    if fs.exists(marker):
        reason = read_json(fs, marker).get("reason", "")
        raise ConfigError(
            f"run {config.run.name} was aborted: {reason}\nTo resume it anyway, delete {marker}; "
            "to start over, choose another run.name"
        )


def finish_tracking(config: Config, metrics_actor: Any) -> None:
    """Close the run's W&B run, if any; a failure is logged and does not hide the run's own outcome."""
    try:
        ray.get(metrics_actor.finish_tracking.remote(), timeout=TRACKING_FINISH_TIMEOUT_S)
    except ray.exceptions.RayError as error:
        logger.error("run %s: closing the W&B run failed: %s", config.run.name, error)


def run_training(config: Config, address: str | None = None, metrics_actor: Any | None = None) -> RunSummary:
    """Run (or resume) the job described by ``config`` to completion and return its summary.

    The metrics actor is created here unless the caller passes one; a caller
    that keeps the handle can scrape the final values after the run.
    """
    started, started_at = time.monotonic(), time.time()
    run_uri = run_uri_of(config)
    check_not_aborted(config, run_uri)
    dataset_uri = prepare_dataset(config.data, absolute_uri(config.storage.uri), config.storage.options)
    check_against_dataset(config, dataset_uri)

    local_cluster = start_ray(address)
    check_against_cluster(config, local_cluster)
    if metrics_actor is None:
        metrics_actor = start_metrics(config)
    # Steps earlier driver sessions ran count as recomputed if this session runs them again.
    ray.get(metrics_actor.mark_known_steps.remote(sorted(final_losses(read_history(run_uri, config.storage.options)))))
    trainer = build_trainer(config, run_uri, dataset_uri, metrics_actor_name(config.run.name))
    logger.info("run %s: %s workers, storage %s", config.run.name, config.scaling.num_workers, run_uri)
    try:
        with stop_on_sigterm(config, metrics_actor):
            trainer.fit()
    finally:
        finish_tracking(config, metrics_actor)

    restarts = ray.get(metrics_actor.restarts.remote())
    goodput = ray.get(metrics_actor.goodput_parts.remote())
    summary = summarize(config, run_uri, time.monotonic() - started, restarts, goodput, started_at=started_at)
    summary.mfu = ray.get(metrics_actor.mean_mfu.remote())
    return summary
