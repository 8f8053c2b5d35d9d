"""Elastic world size on a fake multi-node Ray cluster (ray.cluster_utils.Cluster on 127.0.0.1).

A node is removed mid-run: the run goes on at the smaller world size with the
same global batch. The node comes back: the group grows again. Per-step losses
stay close to an uninterrupted run at the original size. The remove_node fault
kills the raylet of a rank's node, and the run finishes at the smaller size.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import subprocess
import sys
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from service.catalog import list_checkpoints, read_commit_record
from service.config import config_from_dict
from service.driver import RunSummary, run_training
from service.storage import filesystem, read_json
from workers.preemption import request_drain, stop_node
from workers.procfs import is_running
from workers.reporting import final_losses, read_history
from workers.train_loop import rank_process_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

STEPS = 150
REMOVE_AT_STEP = 22  # after the checkpoint at step 20
ADD_BACK_AFTER_STEP = 35  # at world size 1
LOSS_TOLERANCE = 1e-3


def elastic_config(storage: str, name: str, num_workers, faults: list | None = None) -> dict:
    return {
        "run": {"name": name, "seed": 3, "max_failures": 5, "record_samples": True},
        "storage": {"uri": storage},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 40},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "log_every": 2},
        "schedule": {"warmup_steps": 5},
        "checkpoint": {"every_steps": 10, "keep_last": None},
        "metrics": {"port": 0},
        "scaling": {"num_workers": num_workers, "resize_check_interval_s": 5, "worker_group_start_timeout_s": 20},
        "faults": faults or [],
    }


@pytest.fixture(scope="module")
def cluster():
    # The head runs the driver's actors only (no CPUs), so every worker sits on a removable node.
    fake = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [fake.add_node(num_cpus=1) for _ in range(2)]
    fake.wait_for_nodes()
    ray.init(address=fake.address)
    try:
        yield fake, nodes
    finally:
        ray.shutdown()
        fake.shutdown()


def _records_where(run_uri: str, predicate) -> list[dict]:
    return [record for record in read_history(run_uri) if predicate(record)]


def _wait(condition, limit_s: float, what: str, errors: list) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if errors:
            raise AssertionError(f"the run failed while waiting for {what}: {errors[0]!r}")
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {limit_s} s waiting for {what}")


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    fake, nodes = cluster
    storage = str(tmp_path_factory.mktemp("storage"))
    reference = run_training(config_from_dict(elastic_config(storage, "reference", 2)))

    run_uri = f"{storage}/elastic"
    results: list[RunSummary] = []
    errors: list[BaseException] = []

    def train() -> None:
        try:
            # Steps of 0.5 s from the add-back on leave Ray's resize check time to see the node
            # before the run ends; the delay does not change the numerics.
            slow = [{"kind": "slow", "rank": 0, "step": ADD_BACK_AFTER_STEP, "seconds": 0.5}]
            results.append(run_training(config_from_dict(elastic_config(storage, "elastic", [1, 2], slow))))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    _wait(lambda: bool(_records_where(run_uri, lambda r: r["step"] >= REMOVE_AT_STEP)), 300, f"step {REMOVE_AT_STEP}", errors)
    fake.remove_node(nodes[1])
    _wait(lambda: bool(_records_where(run_uri, lambda r: r["world_size"] == 1 and r["step"] >= ADD_BACK_AFTER_STEP)),
          400, "training at world size 1", errors)
    nodes.append(fake.add_node(num_cpus=1))
    _wait(lambda: bool(_records_where(run_uri, lambda r: r["world_size"] == 2 and r["step"] > ADD_BACK_AFTER_STEP)),
          400, "the worker group to grow back to 2", errors)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the elastic run did not finish within 600 s after the node came back"
    assert not errors, f"the elastic run failed: {errors[0]!r}"
    return storage, reference, results[0]


def test_elastic_run_finishes(runs):
    _, _, summary = runs
    assert summary.steps == STEPS


def test_elastic_run_shrinks_then_grows(runs):
    storage, _, _ = runs
    sizes = [record["world_size"] for record in read_history(f"{storage}/elastic")]
    first_small = sizes.index(1)
    assert sizes[0] == 2
    assert 2 in sizes[first_small:], "the worker group never grew back to 2"


def test_elastic_losses_match_reference(runs):
    storage, _, _ = runs
    reference = final_losses(read_history(f"{storage}/reference"))
    records = read_history(f"{storage}/elastic")
    elastic = final_losses(records)
    assert sorted(elastic) == sorted(reference)
    small = sorted({record["step"] for record in records if record["world_size"] == 1 and elastic.get(record["step"]) == record["loss"]})
    assert len(small) >= 10, f"too few final steps ran at world size 1: {small}"
    resumed_from = min(record["step"] for record in records if record["world_size"] == 1)
    compared = [step for step in sorted(elastic) if step >= resumed_from]
    assert len(compared) >= 30
    worst = max(abs(elastic[step] - reference[step]) for step in compared)
    assert worst <= LOSS_TOLERANCE, f"max |loss difference| after the resize {worst:.2e} exceeds {LOSS_TOLERANCE}"


def test_elastic_run_consumes_same_samples(runs):
    """Across the shrink and the growth, the samples behind the final steps are those of the reference run."""
    storage, _, _ = runs
    final_reference = {record["step"]: record for record in read_history(f"{storage}/reference")}
    final_elastic = {record["step"]: record for record in read_history(f"{storage}/elastic")}
    for step in range(1, STEPS + 1):
        assert final_elastic[step]["samples"] == final_reference[step]["samples"], f"step {step} trained on other samples"


REMOVE_NODE_STEPS = 30
REMOVE_NODE_AT_STEP = 12  # after the checkpoint at step 10


def _alive_worker_node_ids() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0}


def _start_run(tree: dict) -> tuple[threading.Thread, list[RunSummary], list[BaseException]]:
    """Start a run on a thread; its summary or its error lands in the returned lists."""
    results: list[RunSummary] = []
    errors: list[BaseException] = []

    def train() -> None:
        try:
            results.append(run_training(config_from_dict(tree)))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    return thread, results, errors


def _finish_run(thread: threading.Thread, results: list[RunSummary], errors: list[BaseException], limit_s: float) -> RunSummary:
    thread.join(timeout=limit_s)
    assert not thread.is_alive(), f"the run did not finish within {limit_s} s"
    assert not errors, f"the run failed: {errors[0]!r}"
    return results[0]


def _ensure_two_worker_nodes(fake: Cluster, nodes: list) -> None:
    # Earlier tests of this module may have removed nodes, some behind the Cluster's back when the
    # remove_node fault killed a raylet. So count live nodes instead of calling wait_for_nodes.
    missing = 2 - len(_alive_worker_node_ids())
    for _ in range(missing):
        nodes.append(fake.add_node(num_cpus=1))
    _wait(lambda: len(_alive_worker_node_ids()) >= 2, 60, "two live worker nodes", [])
    assert len(_alive_worker_node_ids()) == 2
    # An elastic run sizes its first worker group by the CPUs free now, which lag a new node.
    _wait(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "two free CPUs", [])


def test_remove_node_fault_shrinks_run(cluster, tmp_path):
    fake, nodes = cluster
    _ensure_two_worker_nodes(fake, nodes)
    alive_before = _alive_worker_node_ids()

    storage = str(tmp_path)
    faults = [{"kind": "remove_node", "rank": 1, "step": REMOVE_NODE_AT_STEP}]
    tree = elastic_config(storage, "remove-node", [1, 2], faults)
    tree["train"]["steps"] = REMOVE_NODE_STEPS
    summary = _finish_run(*_start_run(tree), limit_s=600)

    assert summary.steps == REMOVE_NODE_STEPS
    run_uri = f"{storage}/remove-node"
    rank1 = read_json(filesystem(run_uri), rank_process_file(run_uri, 1, 1))
    assert alive_before - _alive_worker_node_ids() == {rank1["node_id"]}, "the node of rank 1 is still alive"
    assert filesystem(run_uri).exists(f"{run_uri}/faults/remove_node-rank1-step{REMOVE_NODE_AT_STEP}.json")
    records = read_history(run_uri)
    assert sorted(final_losses(records)) == list(range(1, REMOVE_NODE_STEPS + 1))
    first_attempt = [record for record in records if record["attempt"] == 1]
    assert {record["world_size"] for record in first_attempt} == {2}
    # The history is written per logging interval, so the last steps before the removal may be missing.
    assert first_attempt[-1]["step"] < REMOVE_NODE_AT_STEP, "a step ran on the removed node at or after the fault's step"
    last_attempt = [record for record in records if record["attempt"] == max(r["attempt"] for r in records)]
    assert {record["world_size"] for record in last_attempt} == {1}
    assert last_attempt[0]["step"] == 11, "the run did not resume from the checkpoint at step 10"
    assert last_attempt[-1]["step"] == REMOVE_NODE_STEPS


DRAIN_STEPS = 60
DRAIN_AT_STEP = 6


def _preemption_commits(run_uri: str) -> list[int]:
    fs = filesystem(run_uri)
    return [info.step for info in list_checkpoints(fs, run_uri)
            if info.committed and read_commit_record(fs, info.checkpoint_id).reason == "preemption"]


@pytest.mark.parametrize("stop", ["ray-drain", "stop-node", "sigterm-only"])
def test_preempted_node_saves_then_run_resumes(cluster, tmp_path, stop):
    """Preempt the node of rank 1 in one of three ways, then remove it (unless it was not drained).

    ``ray-drain``: Ray drains the node, as the autoscaler and ``ray drain-node`` do. ``stop-node``:
    a drain, then SIGTERM to the workers, as the preStop hook runs it. ``sigterm-only``: SIGTERM
    alone, so only the SIGTERM path can save the checkpoint; the node stays, and the run resumes on it.
    """
    fake, nodes = cluster
    _ensure_two_worker_nodes(fake, nodes)
    storage = str(tmp_path)
    run_uri = f"{storage}/{stop}"
    tree = elastic_config(storage, stop, [1, 2], [{"kind": "slow", "rank": 0, "step": 1, "seconds": 0.3}])
    tree["train"]["steps"] = DRAIN_STEPS
    # No interval saves: the only checkpoints before the end are the ones the preemption triggers.
    tree["checkpoint"]["every_steps"] = None
    thread, results, errors = _start_run(tree)
    at_two_ranks = lambda r: r["step"] >= DRAIN_AT_STEP and r["world_size"] == 2  # noqa: E731
    _wait(lambda: bool(_records_where(run_uri, at_two_ranks)), 300, f"step {DRAIN_AT_STEP} at 2 ranks", errors)
    attempt = _records_where(run_uri, at_two_ranks)[-1]["attempt"]
    rank1 = read_json(filesystem(run_uri), rank_process_file(run_uri, attempt, 1))
    if stop == "ray-drain":
        request_drain(rank1["node_id"], ray.get_runtime_context().gcs_address, time.time() + 120, "spot reclaim (test)")
        # Ray Train polls the drain state every 5 s, and the ranks ask Ray Train at every logging interval.
        _wait(lambda: bool(_preemption_commits(run_uri)), 120, "a checkpoint saved for the preemption", errors)
    elif stop == "stop-node":
        # As the preStop hook runs it: a process of its own, which must find the cluster's token itself.
        hook = subprocess.run([sys.executable, "-m", "service.cli", "stop-node", "--node-id", rank1["node_id"],
                               "--grace-s", "60"], capture_output=True, text=True, timeout=120, check=False)
        assert hook.returncode == 0, hook.stderr[-2000:]
        assert "the GCS accepted the drain" in hook.stderr, hook.stderr[-2000:]
        assert not is_running(rank1["pid"]), "rank 1 is still running"
        assert _preemption_commits(run_uri), "the workers exited without a checkpoint"
    else:
        assert stop_node(rank1["node_id"], grace_s=60, drain=False) == [], "workers still run after the grace period"
        assert not is_running(rank1["pid"]), "rank 1 is still running"
        assert _preemption_commits(run_uri), "the workers exited without a checkpoint"
    saved_step = max(_preemption_commits(run_uri))
    if stop != "sigterm-only":
        # The reclaim: the drained node goes away. Without a drain, the node stays: Ray Train may
        # already be placing the next worker group on it (see docs/operations.md, --no-drain).
        node = next(node for node in nodes if node.node_id == rank1["node_id"])
        fake.remove_node(node)
        nodes.remove(node)
    summary = _finish_run(thread, results, errors, limit_s=600)

    assert summary.steps == DRAIN_STEPS
    assert saved_step > DRAIN_AT_STEP
    records = read_history(run_uri)
    assert sorted(final_losses(records)) == list(range(1, DRAIN_STEPS + 1))
    last_attempt = [record for record in records if record["attempt"] == max(r["attempt"] for r in records)]
    assert {record["world_size"] for record in last_attempt} == ({2} if stop == "sigterm-only" else {1})
    assert last_attempt[0]["step"] == saved_step + 1, "the run did not resume from the preemption checkpoint"
