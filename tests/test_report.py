"""`stalwart report RUN` on a run written to storage by the project's own writers.

The history has a rollback (steps 6-8 run twice) and a restart (attempt 2 resumes
at step 11 after a commit at step 10). Its timestamps are exact, so the test checks
the summary's goodput parts to the tenth of a second. The PNG is opened and
searched for the vertical lines that mark restarts, rollbacks and checkpoints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import report
from service.catalog import COMMIT_MARKER, checkpoint_dir_name, checkpoints_uri
from service.storage import filesystem, join, write_bytes, write_json
from workers.reporting import ProgressReporter, StepRecord
from workers.train_loop import ATTEMPTS_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = "reported"
STARTED_AT = 1_000_000.0
STARTUP_S = 2.0
STEP_S = 1.0
CHECKPOINT_S = 0.5
RECOVERY_S = 7.0
COMMITTED_STEPS = (5, 10, 15)
# matplotlib's tab:orange, tab:red and tab:green, which the report uses for the markers.
ORANGE, RED, GREEN = (255, 127, 14), (214, 39, 40), (44, 160, 44)


def write_attempt(run_uri: str, attempt: int, started_at: float, steps: list[tuple[int, str]], clock: float) -> float:
    """Write one attempt's history with the real reporter; return the end time of its last step."""
    reporter = ProgressReporter(run_name=RUN, run_uri=run_uri, attempt=attempt, world_size=2, storage_options={},
                                metrics_actor=None, total_steps=16)
    write_json(filesystem(run_uri), join(run_uri, ATTEMPTS_DIR, f"attempt-{attempt:04d}.json"),
               {"attempt": attempt, "world_size": 2, "started_at": started_at})
    for index, (step, action) in enumerate(steps):
        clock += STEP_S
        events = [{"detector": "loss_zscore", "action": "rollback", "step": step, "value": 9.0, "threshold": 6.0}] \
            if action == "rollback" else []
        checkpoint_s = CHECKPOINT_S if step in COMMITTED_STEPS and action == "step" else 0.0
        reporter.add(StepRecord(step=step, loss=5.0 / step + (3.0 if action == "rollback" else 0.0), grad_norm=1.0 + step / 10,
                                lr=1e-3 * min(1.0, step / 4), tokens=512, skipped=action != "step", attempt=attempt,
                                world_size=2, time=clock, action=action, events=events, duration_s=STEP_S,
                                checkpoint_s=checkpoint_s))
        clock += checkpoint_s  # the save blocks the loop after the step
        if index % 4 == 3:
            reporter.flush()
    reporter.flush()
    return clock


def build_run(run_uri: str, with_faults: bool) -> None:
    fs = filesystem(run_uri)
    clock = STARTED_AT + STARTUP_S
    if with_faults:
        # Steps 1-8, a spike at 8 rolls back to the checkpoint of step 5, then 6-12; killed after 12.
        steps = [(step, "step") for step in range(1, 8)] + [(8, "rollback")] + [(step, "step") for step in range(6, 13)]
        clock = write_attempt(run_uri, 1, STARTED_AT, steps, clock)
        # Attempt 2 resumes after the commit at step 10; its first step starts RECOVERY_S after attempt 1's last.
        write_attempt(run_uri, 2, clock + 3.0, [(step, "step") for step in range(11, 17)], clock + RECOVERY_S)
        committed = COMMITTED_STEPS
    else:
        write_attempt(run_uri, 1, STARTED_AT, [(step, "step") for step in range(1, 17)], clock)
        committed = ()
    for step in committed:
        write_bytes(fs, join(checkpoints_uri(run_uri), checkpoint_dir_name(step), COMMIT_MARKER), b"{}")
    # A folder without its commit record is not a checkpoint and must not be marked.
    write_bytes(fs, join(checkpoints_uri(run_uri), checkpoint_dir_name(16), "train_state.json"), b"{}")


def run_report(storage: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "report", RUN, "--set", f"storage.uri={storage}", "-o", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture(scope="module")
def faulty_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    storage = tmp_path_factory.mktemp("faulty")
    build_run(str(storage / RUN), with_faults=True)
    output = storage / "report.png"
    return run_report(storage, output), output


@pytest.fixture(scope="module")
def clean_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    storage = tmp_path_factory.mktemp("clean")
    build_run(str(storage / RUN), with_faults=False)
    output = storage / "report.png"
    return run_report(storage, output), output


def vertical_lines(path: Path, color: tuple[int, int, int], min_fraction: float) -> list[int]:
    """Return the x pixel of each vertical line of ``color`` covering at least ``min_fraction`` of the height."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    close = np.abs(pixels - np.array(color)).sum(axis=2) < 90
    columns = np.flatnonzero(close.sum(axis=0) >= min_fraction * pixels.shape[0])
    lines: list[list[int]] = []
    for column in columns:
        if lines and column - lines[-1][-1] <= 2:
            lines[-1].append(int(column))
        else:
            lines.append([int(column)])
    return [line[0] for line in lines]


def test_report_exits_cleanly(faulty_report):
    result, _ = faulty_report
    assert result.returncode == 0, result.stdout + result.stderr


def test_summary_counts(faulty_report):
    result, output = faulty_report
    text = result.stdout
    assert f"run {RUN}: steps 1..16, {16 * 512:,} tokens" in text
    assert "attempts 2 (restarts 1); steps recomputed 5" in text
    assert "stability events 1 (rollbacks 1)" in text
    assert "committed checkpoints: 5, 10, 15" in text
    assert f"plot written to {output}" in text


def test_summary_goodput_parts(faulty_report):
    result, _ = faulty_report
    (line,) = [line for line in result.stdout.splitlines() if line.strip().startswith("goodput")]
    # 16 first executions and 5 re-executions of 1 s; 3 checkpoint stalls of 0.5 s (the one at
    # step 5 before the rollback, 10 and 15); 2 s of start-up; 7 s between the attempts.
    total_s = STARTUP_S + 21 * STEP_S + 3 * CHECKPOINT_S + RECOVERY_S
    for part, seconds in (("productive", 16.0), ("recomputed", 5.0), ("recovery", RECOVERY_S),
                          ("checkpoint", 3 * CHECKPOINT_S), ("startup", STARTUP_S), ("other", 0.0)):
        assert f"{part} {seconds:.1f} s" in line, line
    assert f"goodput {16.0 / total_s:.1%} of {total_s:.0f} s" in line


def test_png_size(faulty_report):
    _, output = faulty_report
    assert output.stat().st_size > 20_000
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 880)  # 10 x 8 inches at 110 dpi


def test_png_marks_restart_rollback_and_checkpoints(faulty_report):
    _, output = faulty_report
    # Restart and rollback lines are dashed across all three plots; checkpoints are dotted on the loss plot.
    assert len(vertical_lines(output, ORANGE, 0.25)) == 1
    assert len(vertical_lines(output, RED, 0.25)) == 1
    assert len(vertical_lines(output, GREEN, 0.03)) == len(COMMITTED_STEPS)


def test_png_without_faults_has_no_marks(clean_report):
    result, output = clean_report
    assert result.returncode == 0, result.stdout + result.stderr
    for color, fraction in ((ORANGE, 0.25), (RED, 0.25), (GREEN, 0.03)):
        assert vertical_lines(output, color, fraction) == []


def test_attempts_folder_matches_train_loop():
    assert report.ATTEMPTS_DIR == ATTEMPTS_DIR


def test_report_of_missing_run_fails(tmp_path):
    result = run_report(tmp_path, tmp_path / "none.png")
    assert result.returncode == 1
    assert "no step history" in result.stdout
    assert not (tmp_path / "none.png").exists()


def test_summary_rate_counts_this_command_only():
    from service.driver import RunSummary  # noqa: PLC0415 (imports ray)

    resumed = RunSummary(run_name="demo", run_uri="/tmp/demo", steps=120, tokens=491_520, wall_s=200.0, first_loss=5.0,
                         last_loss=2.0, restarts=0, skipped_steps=0, committed_steps=[120], events=[], goodput={},
                         stopped=False, session_steps=85, session_tokens=348_160)
    first = resumed.lines()[0]
    assert first == "run demo: 120 steps, 491,520 tokens; this command ran 85 steps in 200 s (1,741 tokens/s)"
    assert "restarts 0 in this command" in resumed.lines()[1]

    fresh = RunSummary(run_name="demo", run_uri="/tmp/demo", steps=120, tokens=491_520, wall_s=200.0, first_loss=5.0,
                       last_loss=2.0, restarts=0, skipped_steps=0, committed_steps=[120], events=[], goodput={},
                       stopped=False, session_steps=120, session_tokens=491_520)
    assert fresh.lines()[0] == "run demo: 120 steps, 491,520 tokens in 200 s (2,458 tokens/s)"
