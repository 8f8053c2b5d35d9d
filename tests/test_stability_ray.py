"""A loss spike injected on a real Ray run: detected, rolled back, a batch window skipped, and the
skip survives a later resume from a checkpoint saved before the rollback."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json

import pytest
import ray

from service.config import config_from_dict
from service.driver import run_training, start_ray
from workers.reporting import final_losses, read_history

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SPIKE_STEP = 27
KILL_STEP = 29  # after the rollback to step 20, before the next checkpoint at 30
STEPS = 40


def spike_config(storage: str, name: str, faults: list[dict]) -> dict:
    return {
        "run": {"name": name, "seed": 11, "max_failures": 2},
        "storage": {"uri": storage},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 40},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "log_every": 5},
        "schedule": {"warmup_steps": 5},
        "checkpoint": {"every_steps": 10, "keep_last": None},
        "stability": {"window": 10, "rollback_skip_batches": 5},
        "metrics": {"port": 0},
        "scaling": {"num_workers": 2},
        "faults": faults,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    storage = str(tmp_path_factory.mktemp("storage"))
    assert start_ray(None), "a Ray instance was already running in this test process"
    try:
        spike = {"kind": "spike", "step": SPIKE_STEP, "factor": 20.0}
        spiky = run_training(config_from_dict(spike_config(storage, "spiky", [spike])))
        killed = run_training(config_from_dict(
            spike_config(storage, "spiky-killed", [spike, {"kind": "kill", "rank": 1, "step": KILL_STEP}])
        ))
    finally:
        ray.shutdown()
    return storage, spiky, killed


def test_spike_detected_and_rolled_back(runs):
    storage, summary, _ = runs
    rollbacks = [event for event in summary.events if event["action"] == "rollback"]
    assert [event["step"] for event in rollbacks] == [SPIKE_STEP]
    assert rollbacks[0]["detector"] == "loss_zscore"
    records = read_history(f"{storage}/spiky")
    spike_record = next(record for record in records if record["action"] == "rollback")
    # The steps after the spike restart at the checkpoint before it.
    after = records[records.index(spike_record) + 1]
    assert after["step"] == 21


def test_skip_window_covers_spike_batch(runs):
    storage, _, _ = runs
    with open(f"{storage}/spiky/data_skips.json", encoding="utf-8") as handle:
        ranges = json.load(handle)["ranges"]
    # Batches 21..27: the configured 5, stretched to reach the spike's batch.
    assert ranges == [[21, SPIKE_STEP - 21 + 1]]


def test_spiky_run_finishes_with_finite_loss(runs):
    storage, summary, _ = runs
    losses = final_losses(read_history(f"{storage}/spiky"))
    assert summary.steps == STEPS
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]


def test_resume_before_rollback_keeps_skipping(runs):
    storage, _, killed = runs
    assert killed.restarts == 1
    records = read_history(f"{storage}/spiky-killed")
    resumed = [record["step"] for record in records if record["attempt"] == 2]
    assert resumed[0] == 21, "the resume must start from the checkpoint saved before the rollback"
    # Same losses as the run without the kill: the resumed attempt skipped the same batches.
    expected = final_losses(read_history(f"{storage}/spiky"))
    actual = final_losses(records)
    mismatched = {step: (expected[step], actual[step]) for step in expected if expected[step] != actual.get(step)}
    assert not mismatched, f"steps whose loss differs after the resume: {mismatched}"
