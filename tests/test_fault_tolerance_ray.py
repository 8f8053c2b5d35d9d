"""Fault tolerance on real Ray, driven through the `stalwart` command as a user runs it:
a hung rank, SIGTERM to the driver or to one worker, a killed driver, and a straggler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from service.catalog import checkpoint_uri, latest_committed, read_commit_record
from service.storage import filesystem
from workers.procfs import is_running
from workers.reporting import final_losses, read_history

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

STALWART = [sys.executable, "-m", "service.cli"]


def write_config(tmp_path: Path, name: str, steps: int, **sections: dict) -> Path:
    tree = {
        "run": {"name": name, "seed": 5, "max_failures": 2},
        "storage": {"uri": str(tmp_path / "storage")},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 40},
        "train": {"steps": steps, "global_batch": 8, "micro_batch": 2, "log_every": 5},
        "schedule": {"warmup_steps": 5},
        "checkpoint": {"every_steps": 10, "keep_last": None},
        "metrics": {"port": 0},
        "scaling": {"num_workers": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            tree.setdefault(section, {}).update(values)
        else:
            tree[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def start_train(config: Path, log: Path) -> subprocess.Popen:
    # A session of its own, so the test can stop the driver and every Ray process it started.
    with open(log, "ab") as output:
        return subprocess.Popen([*STALWART, "train", "-c", str(config)], stdout=output, stderr=subprocess.STDOUT,
                                env=environment(), start_new_session=True)


def run_train(config: Path, log: Path, timeout_s: float = 400) -> int:
    process = start_train(config, log)
    try:
        return process.wait(timeout=timeout_s)
    finally:
        kill_session(process)


def kill_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def wait_for_step(run_uri: str, step: int, process: subprocess.Popen, limit_s: float = 300) -> int:
    """Poll the run's step history until it reaches ``step``; return the newest step seen."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the driver exited early with status {process.returncode}"
        records = read_history(run_uri)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached within {limit_s} s")


def tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-4000:]


def read_rank_process(run_uri: str, attempt: int, rank: int, process: subprocess.Popen, limit_s: float = 120) -> dict:
    """Wait for the process record that a rank writes when its attempt starts, and return it."""
    path = Path(run_uri) / "ranks" / f"attempt-{attempt:04d}-rank-{rank:05d}.json"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the driver exited early with status {process.returncode}"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        time.sleep(0.5)
    raise AssertionError(f"{path} did not appear within {limit_s} s")


def test_hung_rank_restarted_by_watchdog(tmp_path):
    config = write_config(tmp_path, "hang", 24, fault_tolerance={"hang_timeout_s": 10},
                          faults=[{"kind": "hang", "rank": 1, "step": 13, "seconds": 600}])
    log = tmp_path / "hang.log"
    started = time.monotonic()
    assert run_train(config, log) == 0, tail(log)
    elapsed_s = time.monotonic() - started
    run_uri = str(tmp_path / "storage" / "hang")
    records = read_history(run_uri)
    assert sorted(final_losses(records)) == list(range(1, 25))
    assert {record["attempt"] for record in records} == {1, 2}
    first_resumed = min(record["step"] for record in records if record["attempt"] == 2)
    assert first_resumed == 11  # the checkpoint at step 10 + 1
    hangs = list((tmp_path / "storage" / "hang" / "hangs").glob("attempt-0001-rank-*.json"))
    assert hangs, "no hang was recorded by the watchdog"
    assert elapsed_s < 600, "the hang lasted as long as the fault: the watchdog did not act"


def test_sigterm_saves_then_same_command_resumes(tmp_path):
    config = write_config(tmp_path, "preempt", 400)
    log = tmp_path / "preempt.log"
    run_uri = str(tmp_path / "storage" / "preempt")
    process = start_train(config, log)
    try:
        wait_for_step(run_uri, 13, process)
        os.kill(process.pid, signal.SIGTERM)
        status = process.wait(timeout=150)
    finally:
        kill_session(process)
    assert status == 143, tail(log)
    records = read_history(run_uri)
    stopped_at = records[-1]["step"]
    latest = latest_committed(filesystem(run_uri), run_uri)
    assert latest is not None and latest.step == stopped_at, "the stop did not commit a checkpoint at its last step"
    assert "stop requested" in tail(log)

    config.write_text(config.read_text(encoding="utf-8").replace("steps: 400", f"steps: {stopped_at + 5}"), encoding="utf-8")
    assert run_train(config, log) == 0, tail(log)
    resumed = [record for record in read_history(run_uri) if record["attempt"] == 2]
    assert resumed[0]["step"] == stopped_at + 1
    assert resumed[-1]["step"] == stopped_at + 5


def test_killed_driver_resumes_from_storage(tmp_path):
    config = write_config(tmp_path, "driver", 400)
    log = tmp_path / "driver.log"
    run_uri = str(tmp_path / "storage" / "driver")
    process = start_train(config, log)
    try:
        wait_for_step(run_uri, 22, process)
    finally:
        # SIGKILL to the driver and its embedded cluster: nothing gets to save.
        kill_session(process)
    # Workers of the dead driver can outlive it for a moment and still commit a save in
    # flight, so wait until the newest committed step stops changing.
    latest = latest_committed(filesystem(run_uri), run_uri)
    stable_since, deadline = time.monotonic(), time.monotonic() + 60
    while time.monotonic() - stable_since < 10 and time.monotonic() < deadline:
        time.sleep(1)
        current = latest_committed(filesystem(run_uri), run_uri)
        if current != latest:
            latest, stable_since = current, time.monotonic()
    assert latest is not None and latest.step >= 20
    config.write_text(config.read_text(encoding="utf-8").replace("steps: 400", f"steps: {latest.step + 5}"), encoding="utf-8")
    assert run_train(config, log) == 0, tail(log)
    attempts = {}
    for record in read_history(run_uri):
        attempts.setdefault(record["attempt"], []).append(record["step"])
    assert attempts[max(attempts)][0] == latest.step + 1
    assert attempts[max(attempts)][-1] == latest.step + 5


def test_straggler_flagged(tmp_path):
    config = write_config(tmp_path, "straggler", 30, train={"log_every": 2},
                          faults=[{"kind": "slow", "rank": 1, "step": 1, "seconds": 0.3}],
                          fault_tolerance={"straggler_intervals": 2})
    log = tmp_path / "straggler.log"
    assert run_train(config, log) == 0, tail(log)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "straggler: rank 1" in text
    assert "straggler: rank 0" not in text


def test_sigterm_to_worker_saves_and_run_finishes(tmp_path):
    steps, grace_s = 30, 60.0
    # Steps of 0.2 s leave time between the signal and the checkpoint at step 20, so the stop
    # step gets a preemption save of its own. The delay does not change the numerics.
    sections = {"run": {"record_samples": True}, "fault_tolerance": {"stop_grace_s": grace_s},
                "faults": [{"kind": "slow", "rank": 0, "step": 1, "seconds": 0.2}]}
    config = write_config(tmp_path, "worker-sigterm", steps, **sections)
    log = tmp_path / "worker-sigterm.log"
    run_uri = str(tmp_path / "storage" / "worker-sigterm")
    process = start_train(config, log)
    try:
        wait_for_step(run_uri, 13, process)
        rank1 = read_rank_process(run_uri, 1, 1, process)
        sent_at = time.time()
        os.kill(rank1["pid"], signal.SIGTERM)
        read_rank_process(run_uri, 2, 1, process)
        deadline = time.monotonic() + 60
        while is_running(rank1["pid"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not is_running(rank1["pid"]), "the preempted worker process still runs in the next attempt"
        status = process.wait(timeout=400)
    finally:
        kill_session(process)
    assert status == 0, tail(log)

    records = read_history(run_uri)
    stopped_at = max(record["step"] for record in records if record["attempt"] == 1)
    first_resumed = min(record["step"] for record in records if record["attempt"] == 2)
    assert first_resumed == stopped_at + 1, "the restart did not resume right after the agreed stop step"
    assert 15 <= stopped_at < 20, f"the signal sent after step 15 stopped the run at step {stopped_at}"
    commit = read_commit_record(filesystem(run_uri), checkpoint_uri(run_uri, stopped_at))
    assert commit.reason == "preemption"
    assert commit.committed_at - sent_at <= grace_s, "the checkpoint committed after fault_tolerance.stop_grace_s"
    assert {record["attempt"] for record in records} == {1, 2}
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "received SIGTERM" in text
    assert "restarts 1 in this command;" in text

    reference_config = write_config(tmp_path, "worker-sigterm-reference", steps, **sections)
    assert run_train(reference_config, tmp_path / "reference.log") == 0, tail(tmp_path / "reference.log")
    reference = read_history(str(tmp_path / "storage" / "worker-sigterm-reference"))
    losses, reference_losses = final_losses(records), final_losses(reference)
    assert sorted(losses) == list(range(1, steps + 1))
    mismatched = {step: (reference_losses[step], losses[step]) for step in losses if losses[step] != reference_losses[step]}
    assert not mismatched, f"steps whose loss differs from the uninterrupted run: {mismatched}"
    final, final_reference = ({record["step"]: record for record in history} for history in (records, reference))
    for step in range(1, steps + 1):
        assert sorted(final[step]["samples"]) == sorted(final_reference[step]["samples"]), f"step {step} trained on other samples"


def test_remove_node_on_head_kills_rank_only(tmp_path):
    # The embedded cluster has one node, the head, which runs the GCS and must stay.
    config = write_config(tmp_path, "head-node", 16, faults=[{"kind": "remove_node", "rank": 1, "step": 12}])
    log = tmp_path / "head-node.log"
    assert run_train(config, log) == 0, tail(log)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "runs on the head node" in text
    assert "SIGKILL to its raylet" not in text
    records = read_history(str(tmp_path / "storage" / "head-node"))
    assert sorted(final_losses(records)) == list(range(1, 17))
    assert min(record["step"] for record in records if record["attempt"] == 2) == 11
