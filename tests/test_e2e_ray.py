"""End to end on a real local Ray cluster: train, commit checkpoints, survive a killed rank.

Both runs share one embedded Ray cluster bound to 127.0.0.1. The killed run
must finish, restart at the last committed step + 1, and reproduce the
uninterrupted run's per-step losses bitwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ipaddress
import subprocess
import threading
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from s3_server import TcpForwarder
from service.catalog import list_checkpoints
from service.config import config_from_dict
from service.driver import run_training, start_metrics, start_ray
from service.storage import filesystem
from workers.reporting import final_losses, read_history

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

STEPS = 30
KILL_STEP = 25
CHECKPOINT_EVERY = 10


def tiny_config(storage: str, name: str, **sections: dict) -> dict:
    tree = {
        "run": {"name": name, "seed": 7, "max_failures": 2, "record_samples": True},
        "storage": {"uri": storage},
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "data": {"max_files": 40},
        "train": {"steps": STEPS, "global_batch": 8, "micro_batch": 2, "log_every": 5},
        "schedule": {"warmup_steps": 5},
        "checkpoint": {"every_steps": CHECKPOINT_EVERY, "keep_last": 2},
        "metrics": {"port": 0},
        "scaling": {"num_workers": 2},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


@pytest.fixture(scope="module")
def ray_cluster():
    embedded = start_ray(None)
    assert embedded, "a Ray instance was already running in this test process"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("storage"))


@pytest.fixture(scope="module")
def clean_run(ray_cluster, storage):
    config = config_from_dict(tiny_config(storage, "clean"))
    actor = start_metrics(config)
    summary = run_training(config, metrics_actor=actor)
    host, port = ray.get(actor.address.remote())
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        scrape = response.read().decode("utf-8")
    return config, summary, scrape


@pytest.fixture(scope="module")
def killed_run(clean_run, storage):
    tree = tiny_config(storage, "killed")
    tree["faults"] = [{"kind": "kill", "rank": 1, "step": KILL_STEP}]
    config = config_from_dict(tree)
    summary = run_training(config)
    return config, summary


def run_uri(storage: str, name: str) -> str:
    return f"{storage}/{name}"


def test_clean_run_loss_falls(clean_run, storage):
    _, summary, _ = clean_run
    losses = final_losses(read_history(run_uri(storage, "clean")))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert summary.steps == STEPS
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.5, f"loss did not fall: first five mean {first:.3f}, last five mean {last:.3f}"


def test_clean_run_commits_checkpoints(clean_run, storage):
    uri = run_uri(storage, "clean")
    infos = list_checkpoints(filesystem(uri), uri)
    # keep_last=2 leaves the two newest of 10, 20, 30.
    assert [info.step for info in infos if info.usable] == [20, 30]


def test_clean_run_exports_metrics(clean_run):
    _, _, scrape = clean_run
    families = {family.name: family for family in text_string_to_metric_families(scrape)}
    step = families["stalwart_step"].samples[0]
    assert step.value == STEPS
    assert step.labels == {"run": "clean"}
    # prometheus-client strips _total from family names; the sample keeps it exactly once.
    token_samples = [sample.name for sample in families["stalwart_tokens"].samples]
    assert "stalwart_tokens_total" in token_samples
    assert families["stalwart_last_committed_step"].samples[0].value == STEPS
    assert "stalwart_checkpoint_save_seconds" in families
    restarts = {sample.labels["cause"]: sample.value for sample in families["stalwart_restarts"].samples
                if sample.name == "stalwart_restarts_total"}
    assert restarts == {"failure": 0, "hang": 0, "preempted": 0}
    goodput = families["stalwart_goodput_ratio"].samples[0].value
    assert 0 < goodput < 1


def test_killed_run_finishes(killed_run):
    _, summary = killed_run
    assert summary.steps == STEPS
    assert summary.restarts == 1


def test_killed_run_restarts_after_last_commit(killed_run, storage):
    records = read_history(run_uri(storage, "killed"))
    attempts = sorted({record["attempt"] for record in records})
    assert attempts == [1, 2]
    last_committed_before_kill = (KILL_STEP - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    first_step_of_restart = min(record["step"] for record in records if record["attempt"] == 2)
    assert first_step_of_restart == last_committed_before_kill + 1


def test_killed_run_losses_bitwise_equal(clean_run, killed_run, storage):
    clean = final_losses(read_history(run_uri(storage, "clean")))
    killed = final_losses(read_history(run_uri(storage, "killed")))
    assert sorted(killed) == sorted(clean)
    mismatched = {step: (clean[step], killed[step]) for step in clean if clean[step] != killed[step]}
    assert not mismatched, f"steps whose loss differs from the uninterrupted run: {mismatched}"


def _descendant_pids(root: int) -> set[int]:
    found, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        try:
            children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout.split()
        except subprocess.TimeoutExpired:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False  # "*" or "0.0.0.0"-style wildcards
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_ray_listens_on_loopback_only(clean_run):
    # Ray's raylet, GCS and workers are started by this process or by the raylet.
    # NOTE: this runs after training. While training runs, rank 0 also hosts torch's
    # TCPStore rendezvous server, which torch 2.13 binds to every interface (it has no
    # bind-address setting); README.md lists that under Limits.
    pids = _descendant_pids(os.getpid()) | {os.getpid()}
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    ours = [line for line in listing.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert ours, "found no listening socket of the Ray processes; is ss able to see process ids?"
    exposed = [line for line in ours if not _is_loopback(line.split()[3].rsplit(":", 1)[0])]
    assert not exposed, "sockets listening beyond loopback:\n" + "\n".join(exposed)


def consumed_samples(records: list[dict], up_to_step: int) -> list[int]:
    """Return the sorted multiset of sample indices behind the final run of steps 1..up_to_step."""
    final = {record["step"]: record for record in records}
    return sorted(index for step in range(1, up_to_step + 1) for index in final[step]["samples"])


def test_killed_run_consumes_same_samples(clean_run, killed_run, storage):
    clean = read_history(run_uri(storage, "clean"))
    killed = read_history(run_uri(storage, "killed"))
    assert consumed_samples(killed, STEPS) == consumed_samples(clean, STEPS)
    # Each step trains on exactly one global batch: no repeats inside an epoch's first steps.
    assert len(set(consumed_samples(clean, STEPS))) == STEPS * 8


def test_rerun_after_retention_trains_more(clean_run, killed_run, storage):
    """A second driver session on a run whose retention deleted old checkpoints resumes from storage."""
    tree = tiny_config(storage, "clean")
    tree["train"]["steps"] = STEPS + 5
    summary = run_training(config_from_dict(tree))
    records = read_history(run_uri(storage, "clean"))
    resumed = [record["step"] for record in records if record["attempt"] == max(r["attempt"] for r in records)]
    assert summary.steps == STEPS + 5
    assert resumed == list(range(STEPS + 1, STEPS + 6))


OUTAGE_S = 15


@pytest.mark.s3
def test_run_survives_storage_outage(ray_cluster, private_s3_server, tmp_path):
    """Cut the S3 server off for OUTAGE_S seconds after the first commit: the attempt waits and finishes."""
    forwarder = TcpForwarder(tmp_path / "forwarder.log", target_port=private_s3_server.port)
    forwarder.start()
    try:
        bucket = private_s3_server.create_bucket()
        tree = tiny_config(f"s3://{bucket}/runs", "outage", checkpoint={"every_steps": 5, "retry_initial_backoff_s": 1})
        tree["storage"]["options"] = private_s3_server.storage_options(forwarder.port)
        tree["metrics"]["enabled"] = False
        config = config_from_dict(tree)
        direct = filesystem(f"s3://{bucket}", private_s3_server.storage_options())
        run_uri = f"s3://{bucket}/runs/outage"
        results: list = []
        thread = threading.Thread(target=lambda: results.append(run_training(config)), daemon=True)
        thread.start()

        deadline = time.monotonic() + 300
        while not any(info.committed for info in list_checkpoints(direct, run_uri)):
            assert thread.is_alive(), f"the run ended before its first commit: {results}"
            assert time.monotonic() < deadline, "no checkpoint committed within 300 s"
            time.sleep(0.5)
            direct.invalidate_cache()
        forwarder.stop()
        time.sleep(OUTAGE_S)
        forwarder.start()
        thread.join(timeout=600)
    finally:
        forwarder.stop()

    assert results, "the run did not finish"
    summary = results[0]
    assert summary.steps == STEPS
    assert summary.restarts == 0, "the outage ended an attempt"
    records = read_history(run_uri, private_s3_server.storage_options())
    assert {record["attempt"] for record in records} == {1}
    assert sorted(final_losses(records)) == list(range(1, STEPS + 1))
