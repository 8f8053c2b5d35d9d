"""Run report from storage alone: a text summary and a PNG of loss, LR and grad norm.

It reads the step history, the attempts and the checkpoint catalog, so it works
after the driver is gone and without Grafana.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from service.catalog import list_checkpoints
from service.goodput import PARTS as GOODPUT_PARTS
from service.goodput import GoodputTracker
from service.storage import filesystem, join, read_json
from workers.reporting import final_losses, read_history

logger = logging.getLogger(__name__)

# The folder of per-attempt records that workers.train_loop writes (its ATTEMPTS_DIR, kept equal by
# a test). Importing train_loop here would load Ray Train and add seconds to every report.
ATTEMPTS_DIR = "attempts"


@dataclass
class Segment:
    """Consecutive steps run without a restart or rollback in between."""

    attempt: int
    records: list[dict[str, Any]]


def split_segments(records: list[dict[str, Any]]) -> list[Segment]:
    """Cut the history where the attempt changes or the step number goes back (a rollback)."""
    segments: list[Segment] = []
    for record in records:
        current = segments[-1] if segments else None
        if current is None or record["attempt"] != current.attempt or record["step"] <= current.records[-1]["step"]:
            segments.append(Segment(record["attempt"], []))
        segments[-1].records.append(record)
    return segments


def goodput_parts(run_uri: str, records: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> dict[str, float]:
    """Split the run's wall time, from the start of its first attempt to its last step, into goodput parts.

    The parts are those of ``service.goodput`` summed over every driver session,
    so the time between one session's last step and the next one's first step
    counts as recovery.
    """
    fs = filesystem(run_uri, storage_options)
    started = [read_json(fs, path)["started_at"] for path in fs.glob(join(run_uri, ATTEMPTS_DIR, "attempt-*.json"))]
    first_step_start = records[0]["time"] - records[0].get("duration_s", 0.0)
    tracker = GoodputTracker(started_at=min(started, default=first_step_start))
    for record in records:
        tracker.add_step(attempt=record["attempt"], step=record["step"], end_time=record["time"],
                         duration_s=record.get("duration_s", 0.0))
        tracker.add_checkpoint(record.get("checkpoint_s", 0.0))
    return tracker.parts(records[-1]["time"])


def summary_lines(run_uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    records = read_history(run_uri, storage_options)
    if not records:
        return [f"no step history under {run_uri}; check the run name and storage.uri"]
    fs = filesystem(run_uri, storage_options)
    losses = final_losses(records)
    latest = {record["step"]: record for record in records}
    attempts = sorted({record["attempt"] for record in records})
    committed = [info.step for info in list_checkpoints(fs, run_uri) if info.usable]
    events = [event for record in records for event in record.get("events", [])]
    wall_s = records[-1]["time"] - records[0]["time"]
    recomputed = len(records) - len(latest)
    steps = sorted(losses)
    goodput = goodput_parts(run_uri, records, storage_options)
    rollbacks = sum(event["action"] == "rollback" for event in events)

    lines = [
        f"run {run_uri.rsplit('/', 1)[-1]}: steps {steps[0]}..{steps[-1]}, "
        f"{sum(record['tokens'] for record in latest.values()):,} tokens, {wall_s:.0f} s from first to last step",
        f"  loss {losses[steps[0]]:.4f} -> {losses[steps[-1]]:.4f}",
        f"  attempts {len(attempts)} (restarts {len(attempts) - 1}); steps recomputed {recomputed}",
        f"  skipped steps {sum(record['skipped'] for record in latest.values())}; stability events {len(events)} "
        f"(rollbacks {rollbacks})",
        f"  goodput {goodput['productive'] / goodput['total']:.1%} of {goodput['total']:.0f} s: "
        + ", ".join(f"{part} {goodput[part]:.1f} s" for part in GOODPUT_PARTS),
        f"  committed checkpoints: {', '.join(map(str, committed)) or 'none'}",
    ]
    lines += [
        f"    step {event['step']}: {event['detector']} value={event['value']:.4g} threshold={event['threshold']:.4g} "
        f"action={event['action']}"
        for event in events[:20]
    ]
    abort = join(run_uri, "ABORTED.json")
    if fs.exists(abort):
        lines.append(f"  aborted: {read_json(fs, abort).get('reason', '')}")
    return lines


def plot_run(run_uri: str, output_path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write a PNG of loss, LR and grad norm over steps with restarts, rollbacks and checkpoints marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_history(run_uri, storage_options)
    if not records:
        raise ValueError(f"no step history under {run_uri}; check the run name and storage.uri")
    segments = split_segments(records)
    committed = [info.step for info in list_checkpoints(filesystem(run_uri, storage_options), run_uri) if info.usable]

    figure, (loss_axis, lr_axis, norm_axis) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, segment in enumerate(segments):
        steps = [record["step"] for record in segment.records]
        color = colors[index % len(colors)]
        label = f"attempt {segment.attempt}" + (f" (part {index + 1})" if len(segments) > len({s.attempt for s in segments}) else "")
        loss_axis.plot(steps, [record["loss"] for record in segment.records], color=color, label=label, linewidth=1.2)
        lr_axis.plot(steps, [record["lr"] for record in segment.records], color=color, linewidth=1.2)
        norm_axis.plot(steps, [record["grad_norm"] for record in segment.records], color=color, linewidth=1.2)

    for segment in segments[1:]:
        first = segment.records[0]["step"]
        restart = segment.attempt != segments[segments.index(segment) - 1].attempt
        for axis in (loss_axis, lr_axis, norm_axis):
            axis.axvline(first - 0.5, color="tab:orange" if restart else "tab:red", linestyle="--", linewidth=0.8)
    for record in records:
        for event in record.get("events", []):
            marker = {"rollback": "X", "skip": "v", "log": "o"}.get(event["action"], "o")
            loss_axis.scatter([record["step"]], [record["loss"]], color="tab:red", marker=marker, zorder=3, s=50)
    for step in committed:
        loss_axis.axvline(step, color="tab:green", linestyle=":", linewidth=0.8)

    loss_axis.set_ylabel("loss")
    loss_axis.set_yscale("log")
    lr_axis.set_ylabel("learning rate")
    norm_axis.set_ylabel("grad norm")
    norm_axis.set_yscale("log")
    norm_axis.set_xlabel("step")
    loss_axis.legend(loc="upper right", fontsize=8)
    loss_axis.set_title(
        f"{run_uri.rsplit('/', 1)[-1]}: dashed orange = restart, dashed red = rollback, "
        "dotted green = committed checkpoint, red marks = stability events",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)
    return output_path
