"""W&B logging in offline mode: what the tracker writes is read back from the run file."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import config_from_dict
from service.tracking import STEP_KEY, open_tracker

pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e '.[test]'")

from wandb_records import history_rows, summary_values  # noqa: E402


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B's settings and cache inside the test folder, and never reach the network."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def settings(folder: Path, **overrides) -> dict:
    tree = {"wandb": {"enabled": True, "mode": "offline", "project": "stalwart-test", "dir": str(folder), **overrides}}
    return config_from_dict(tree).wandb.model_dump()


def progress(step: int, loss: float, *, events: int = 0, skipped: int = 0, mfu: float | None = None) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_second": 1000.0, "tokens": 512,
            "skipped_steps": skipped, "mfu": mfu,
            "events": [{"detector": "loss_zscore", "action": "rollback"}] * events}


def run_file(folder: Path) -> Path:
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run file, found {files}"
    return files[0]


def test_tracking_off_by_default():
    assert open_tracker("demo", config_from_dict({}).wandb.model_dump(), {}) is None


def test_offline_run_records_progress(wandb_home):
    tracker = open_tracker("demo-run", settings(wandb_home), {"train": {"steps": 20}})
    assert tracker is not None
    tracker.log_progress(progress(5, 4.0, mfu=0.25), goodput_ratio=0.5, restarts=0, world_size=2)
    tracker.log_checkpoint(5, 1.5)
    tracker.log_progress(progress(10, 3.0, events=1, skipped=1, mfu=0.3), goodput_ratio=0.6, restarts=0, world_size=2)
    # After a rollback the step goes back: the row must still be kept.
    tracker.log_progress(progress(6, 3.5, mfu=0.3), goodput_ratio=0.55, restarts=1, world_size=2)
    tracker.finish({"goodput/ratio": 0.55, "restarts": 1})

    rows = history_rows(run_file(wandb_home))
    train_rows = [row for row in rows if "train/loss" in row]
    assert [row[STEP_KEY] for row in train_rows] == [5, 10, 6]
    assert [row["train/loss"] for row in train_rows] == [4.0, 3.0, 3.5]
    assert train_rows[1]["train/stability_events"] == 1
    assert train_rows[1]["train/skipped_steps"] == 1
    assert train_rows[0]["train/mfu"] == 0.25
    assert train_rows[2]["restarts"] == 1
    checkpoint_rows = [row for row in rows if "checkpoint/save_seconds" in row]
    assert checkpoint_rows == [{**checkpoint_rows[0], STEP_KEY: 5, "checkpoint/committed_step": 5,
                                "checkpoint/save_seconds": 1.5}]

    summary = summary_values(run_file(wandb_home))
    assert summary["goodput/ratio"] == 0.55
    assert summary["restarts"] == 1


def test_offline_run_omits_unknown_mfu(wandb_home):
    tracker = open_tracker("cpu-run", settings(wandb_home), {})
    tracker.log_progress(progress(5, 4.0, mfu=None), goodput_ratio=0.5, restarts=0, world_size=1)
    tracker.finish({})

    rows = [row for row in history_rows(run_file(wandb_home)) if "train/loss" in row]
    assert len(rows) == 1
    assert "train/mfu" not in rows[0]
