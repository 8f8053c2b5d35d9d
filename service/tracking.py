"""Optional Weights & Biases logging of a run, done by the run's metrics actor.

The metrics actor already receives every progress update and outlives
worker-group restarts, so one W&B run covers a whole driver session. The W&B
run id is the Stalwart run name and W&B resumes it (``resume="allow"``), so a
resumed Stalwart run keeps appending to the same W&B run.

Steps are logged against the ``train/step`` metric rather than W&B's own step
counter, because W&B drops rows whose step goes backwards, and a restart or a
rollback re-runs earlier steps. The API key comes from the environment
(``WANDB_API_KEY``) or ``wandb login``; it is never part of the config.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

STEP_KEY = "train/step"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


class WandbTracker:
    """One W&B run that mirrors the run's progress updates, checkpoints and final goodput."""

    def __init__(self, run_name: str, settings: dict[str, Any], run_config: dict[str, Any]):
        import wandb

        self._run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity"),
            id=run_name,
            name=run_name,
            resume="allow",
            mode=settings.get("mode", "online"),
            dir=settings.get("dir"),
            config=run_config,
        )
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)
        self._stability_events = 0
        self._skipped_steps = 0

    def log_progress(self, update: dict[str, Any], *, goodput_ratio: float, restarts: int, world_size: int) -> None:
        """Log one logging interval (the dict that ``ProgressReporter.flush`` sends)."""
        self._stability_events += len(update.get("events", []))
        self._skipped_steps += update.get("skipped_steps", 0)
        row = {
            STEP_KEY: update["step"],
            "train/loss": update["loss"],
            "train/learning_rate": update["lr"],
            "train/grad_norm": update["grad_norm"],
            "train/tokens_per_second": update["tokens_per_second"],
            "train/skipped_steps": self._skipped_steps,
            "train/stability_events": self._stability_events,
            "train/world_size": world_size,
            "goodput/ratio": goodput_ratio,
            "restarts": restarts,
        }
        if update.get("mfu") is not None:
            row["train/mfu"] = update["mfu"]
        self._run.log(row)

    def log_checkpoint(self, step: int, save_seconds: float) -> None:
        self._run.log({STEP_KEY: step, "checkpoint/committed_step": step, "checkpoint/save_seconds": save_seconds})

    def finish(self, summary: dict[str, float]) -> None:
        """Store the run's final figures in the W&B summary and close the run (flushes offline files)."""
        for key, value in summary.items():
            self._run.summary[key] = value
        self._run.finish()


def open_tracker(run_name: str, settings: dict[str, Any] | None, run_config: dict[str, Any]) -> WandbTracker | None:
    """Start W&B logging when ``settings`` (the ``wandb`` config section) enables it; return None otherwise.

    A failure to start W&B is logged and training goes on without it: tracking
    must not stop a run.
    """
    if not settings or not settings.get("enabled"):
        return None
    import wandb

    try:
        tracker = WandbTracker(run_name, settings, run_config)
    except wandb.Error as error:
        logger.error("run=%s W&B logging disabled: wandb.init failed: %s", run_name, error)
        return None
    logger.info("run=%s logging to W&B project %s (mode %s)", run_name, settings["project"], settings.get("mode"))
    return tracker
