"""Production checkpointing on a real S3-compatible server (moto on 127.0.0.1) with 2 gloo ranks.

Covers async saves, the commit protocol under storage outages and killed
workers, verification with fallback, retention, unsafe pickles, the
``stalwart checkpoints`` commands and the export. Ranks run in spawned
processes; they write what the test process compares (full states, logs,
flags) to a local folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

import workers.async_save as async_save_module
import workers.checkpoint as checkpoint_module
from dist_helpers import run_distributed
from s3_server import MotoServer, TcpForwarder, free_port, wait_until_refused
from service.checkpoints import verify_run
from service.catalog import (
    COMMIT_MARKER,
    DCP_METADATA_FILE,
    CheckpointInfo,
    CheckpointIntegrityError,
    checkpoint_dir_name,
    checkpoint_uri,
    committed_newest_first,
    list_checkpoints,
    read_commit_record,
    save_dir_uri,
)
from service.cli import main as cli_main
from service.config import CheckpointSection, config_from_dict, redact_secrets
from service.storage import filesystem, join, write_bytes
from workers.async_save import Checkpointer, CheckpointStorageError
from workers.checkpoint import TrainState, load_checkpoint, load_newest_valid
from workers.data import MicroBatch
from workers.model import build_model
from workers.parallel import apply_fsdp
from workers.step import train_step
from workers.train_loop import build_optimizer, model_args

pytestmark = [pytest.mark.s3, pytest.mark.timeout(600)]

WORLD_SIZE = 2
MODEL = {"n_layers": 2, "dim": 32, "n_heads": 4, "vocab_size": 64, "seq_len": 16}
CONFIG = config_from_dict({"model": MODEL, "scaling": {"num_workers": WORLD_SIZE}, "train": {"global_batch": 4, "micro_batch": 2}})
SEED = 7
LR = 1e-2
# Bounded waits inside ranks: generous, because 3-4 test suites may share 2 cores.
WAIT_S = 120.0
HELD_SAVE_S = 1.0  # how long a test keeps a background save from writing
EVIDENCE_FILE = "evidence.json"


# ---------------------------------------------------------------------------
# Code that runs on the ranks
# ---------------------------------------------------------------------------


def _build(world_size: int, seed: int = SEED) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[Any]]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(model_args(CONFIG), seed)
    units = apply_fsdp(model, mesh, param_dtype="float32", reduce_dtype="float32")
    return model, build_optimizer(model, CONFIG), units


def _train_one(model: torch.nn.Module, optimizer: torch.optim.Optimizer, units: list[Any], world_rank: int,
               state: TrainState) -> float:
    """Run the next optimizer step on random tokens that depend only on (step, rank)."""
    step = state.step + 1
    generator = torch.Generator().manual_seed(1000 * step + world_rank)
    tokens = torch.randint(0, CONFIG.model.vocab_size, (CONFIG.train.micro_batch, CONFIG.model.seq_len + 1), generator=generator)
    batch = MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=())
    result = train_step(model, optimizer, [batch], lr=LR, grad_clip=1.0, device=torch.device("cpu"), fsdp_units=units)
    assert not result.skipped, f"step {step} was skipped"
    state.step = step
    state.tokens_seen += result.target_tokens
    return result.loss


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_rank: int) -> dict[str, Any] | None:
    """Gather the unsharded model and optimizer state; a collective that returns it on rank 0 only."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if world_rank != 0:
        return None
    return {"model": model_state, "optimizer_state": optimizer_state["state"],
            "param_groups": [{key: group[key] for key in ("lr", "betas", "eps", "weight_decay")} for group in optimizer_state["param_groups"]]}


def _checkpointer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_rank: int, run_uri: str,
                  options: dict[str, Any], total_steps: int = 1000, saved_config: dict[str, Any] | None = None,
                  **settings: Any) -> Checkpointer:
    section = CheckpointSection(**{"every_steps": None, "save_final": False, "keep_last": "all", **settings})
    saved_config = saved_config if saved_config is not None else CONFIG.model_dump(mode="json")
    return Checkpointer(settings=section, run_uri=run_uri, storage_options=options, saved_config=saved_config,
                        model=model, optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE, total_steps=total_steps)


def _log_to_file(output_dir: str, world_rank: int) -> None:
    handler = logging.FileHandler(os.path.join(output_dir, f"rank{world_rank}.log"))
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("workers", "service"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)


def _write_evidence(output_dir: str, payload: dict[str, Any]) -> None:
    Path(output_dir, EVIDENCE_FILE).write_text(json.dumps(payload))


def _load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_rank: int, checkpoint_id: str,
          options: dict[str, Any]) -> TrainState:
    return load_checkpoint(checkpoint_id, model=model, optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE,
                           seed=SEED, storage_options=options)


def _async_bitwise_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], output_dir: str) -> None:
    """Save step 2 in the background while steps 3-5 change every parameter, then load step 2 into a new model."""
    model, optimizer, units = _build(world_size)
    state = TrainState()
    for _ in range(2):
        _train_one(model, optimizer, units, world_rank, state)
    full = _full_state(model, optimizer, world_rank)
    if full is not None:
        torch.save(full, os.path.join(output_dir, "at_save.pt"))

    # Fault injection: hold the background write until training has moved on, so the two surely overlap.
    trained_on = threading.Event()
    unheld = async_save_module.write_and_commit

    def held_write_and_commit(*args: Any, **kwargs: Any) -> Any:
        assert trained_on.wait(WAIT_S), "training did not finish its steps in time"
        return unheld(*args, **kwargs)

    async_save_module.write_and_commit = held_write_and_commit
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options)
    stall_s = checkpointer.save(state.step, state, loss=None)
    in_flight_after_save = checkpointer.inflight is not None
    for _ in range(3):
        _train_one(model, optimizer, units, world_rank, state)
    trained_on.set()
    checkpointer.close()
    moved = _full_state(model, optimizer, world_rank)

    fresh, fresh_optimizer, _ = _build(world_size, SEED + 1)
    loaded = _load(fresh, fresh_optimizer, world_rank, checkpoint_uri(run_uri, 2), options)
    full = _full_state(fresh, fresh_optimizer, world_rank)
    if full is not None:
        torch.save(full, os.path.join(output_dir, "loaded.pt"))
        torch.save(moved, os.path.join(output_dir, "moved.pt"))
        _write_evidence(output_dir, {"stall_s": stall_s, "in_flight_after_save": in_flight_after_save,
                                     "loaded_step": loaded.step, "committed": checkpointer.last_outcome.committed})


def _outage_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], server_port: int,
                 forwarder_port: int, output_dir: str) -> None:
    """Commit step 1; cut storage off during the save of step 2; keep training; restore storage; the retry commits.

    Rank 0 runs the TCP forwarder that the ranks reach storage through, so it can take it away and bring it back.
    """
    forwarder = TcpForwarder(Path(output_dir, "forwarder.log"), target_port=server_port, port=forwarder_port)
    try:
        if world_rank == 0:
            forwarder.start()
        torch.distributed.barrier()
        _outage_steps(world_rank, world_size, run_uri, options, forwarder, output_dir)
    finally:
        forwarder.stop()


def _outage_steps(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], forwarder: TcpForwarder,
                  output_dir: str) -> None:
    _log_to_file(output_dir, world_rank)
    model, optimizer, units = _build(world_size)
    state = TrainState()
    _train_one(model, optimizer, units, world_rank, state)
    # max_inflight_steps=None: training must not wait for the failing save.
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options, retry_initial_backoff_s=0.5, max_inflight_steps=None)
    checkpointer.save(state.step, state, loss=None)
    checkpointer.wait()
    assert checkpointer.last_outcome is not None and checkpointer.last_outcome.committed

    # Fault injection: rank 0 stops the forwarder right after writing its first file of step 2.
    connected_write_file = checkpoint_module._write_file

    def write_then_disconnect(*args: Any, **kwargs: Any) -> Any:
        entry = connected_write_file(*args, **kwargs)
        if world_rank == 0:
            forwarder.stop()
            wait_until_refused(forwarder.port)
        return entry

    checkpoint_module._write_file = write_then_disconnect
    _train_one(model, optimizer, units, world_rank, state)
    failed_step = state.step
    checkpointer.save(failed_step, state, loss=None)

    # Training goes on while the save fails; each due() polls the background save.
    steps_while_failing = 0
    while checkpointer.failures == 0:
        _train_one(model, optimizer, units, world_rank, state)
        steps_while_failing += 1
        assert checkpointer.due(state.step) is None
        assert steps_while_failing < 5000, "the failing save never reported its failure"
    failure_seen_at = state.step
    checkpoint_module._write_file = connected_write_file
    if world_rank == 0:
        forwarder.start()

    # The next save after the server is back: the retry, due 0.5 s after the failure by rank 0's clock.
    committed_step = None
    for _ in range(5000):
        _train_one(model, optimizer, units, world_rank, state)
        reason = checkpointer.due(state.step)
        if reason is not None:
            checkpointer.save(state.step, state, loss=None, reason=reason)
            checkpointer.wait()
            if checkpointer.last_outcome.committed:
                committed_step = state.step
                break
    checkpointer.close()
    if world_rank == 0:
        _write_evidence(output_dir, {"failed_step": failed_step, "failure_seen_at": failure_seen_at,
                                     "steps_while_failing": steps_while_failing, "committed_step": committed_step,
                                     "failure_error": checkpointer.failures})


def _kill_mid_save_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any]) -> None:
    """Commit step 1, then kill rank 1 with SIGKILL after it wrote its shard of step 2, before the commit."""
    model, optimizer, units = _build(world_size)
    state = TrainState()
    _train_one(model, optimizer, units, world_rank, state)
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options)
    checkpointer.save(state.step, state, loss=None)
    checkpointer.wait()
    _train_one(model, optimizer, units, world_rank, state)

    unkilled_gather = checkpoint_module.all_gather_json

    def gather_or_die(payload: Any, group: Any = None) -> Any:
        if world_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return unkilled_gather(payload, group)

    checkpoint_module.all_gather_json = gather_or_die
    checkpointer.save(state.step, state, loss=None)
    checkpointer.wait()
    raise AssertionError("rank 1 should have been killed during the save")


def _save_with_config_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any],
                           saved_config: dict[str, Any], output_dir: str) -> None:
    """Train one step and save it with ``saved_config`` as the config stored beside the checkpoint."""
    _log_to_file(output_dir, world_rank)
    model, optimizer, units = _build(world_size)
    state = TrainState()
    loss = _train_one(model, optimizer, units, world_rank, state)
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options, saved_config=saved_config)
    checkpointer.save(state.step, state, loss=loss)
    checkpointer.close()
    assert checkpointer.last_outcome is not None and checkpointer.last_outcome.committed


def _load_rejected_rank(world_rank: int, world_size: int, checkpoint_id: str, options: dict[str, Any], output_dir: str) -> None:
    """Load a checkpoint that must be rejected; record the error on rank 0."""
    model, optimizer, _ = _build(world_size)
    try:
        _load(model, optimizer, world_rank, checkpoint_id, options)
    except CheckpointIntegrityError as error:
        if world_rank == 0:
            _write_evidence(output_dir, {"error": str(error)})
        return
    raise AssertionError(f"{checkpoint_id} was loaded")


def _resume_and_resave_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], output_dir: str) -> None:
    """Resume from the newest valid checkpoint, train to step 2 and save it again."""
    _log_to_file(output_dir, world_rank)
    model, optimizer, units = _build(world_size, SEED + 1)
    fs = filesystem(run_uri, options)
    loaded = load_newest_valid(committed_newest_first(fs, run_uri),
                               lambda checkpoint_id: _load(model, optimizer, world_rank, checkpoint_id, options),
                               world_rank=world_rank)
    assert loaded is not None
    info, state = loaded
    resumed_step = state.step
    _train_one(model, optimizer, units, world_rank, state)
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options)
    checkpointer.save(state.step, state, loss=None)
    checkpointer.close()
    if world_rank == 0:
        _write_evidence(output_dir, {"resumed_step": resumed_step, "resumed_from": info.step,
                                     "committed": checkpointer.last_outcome.committed})


def _save_steps_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], num_steps: int,
                     settings: dict[str, Any], output_dir: str) -> None:
    """Train ``num_steps`` steps with the given checkpoint settings, saving as due(); record the last full state."""
    _log_to_file(output_dir, world_rank)
    model, optimizer, units = _build(world_size)
    state = TrainState()
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options, total_steps=num_steps, **settings)
    losses = []
    for _ in range(num_steps):
        losses.append(_train_one(model, optimizer, units, world_rank, state))
        reason = checkpointer.due(state.step)
        if reason is not None:
            checkpointer.save(state.step, state, loss=losses[-1], reason=reason)
    checkpointer.close()
    full = _full_state(model, optimizer, world_rank)
    if full is not None:
        torch.save(full, os.path.join(output_dir, "final.pt"))


def _policy_rank(world_rank: int, world_size: int, run_uri: str, output_dir: str) -> None:
    """Record what due() and save() decide for time, request, final and a save due while another is in flight."""
    _log_to_file(output_dir, world_rank)
    model, optimizer, _ = _build(world_size)
    state = TrainState(step=1)
    decisions: dict[str, Any] = {}

    timed = _checkpointer(model, optimizer, world_rank, run_uri, {}, total_steps=5, every_hours=1e-9, save_final=True)
    # Decisions read the poll started one step earlier: step 1 starts it, step 2 starts the clock.
    decisions["first_polls"] = [timed.due(1), timed.due(2)]
    decisions["time"] = timed.due(3)
    timed.request("stability")
    decisions["requested"] = timed.due(4)
    decisions["final"] = timed.due(5)
    timed.close()

    # A save held in flight, then another one due with overlap_policy=skip.
    release = threading.Event()
    unheld = async_save_module.write_and_commit

    def held_write_and_commit(*args: Any, **kwargs: Any) -> Any:
        assert release.wait(WAIT_S), "the test did not release the held save"
        return unheld(*args, **kwargs)

    async_save_module.write_and_commit = held_write_and_commit
    skipping = _checkpointer(model, optimizer, world_rank, run_uri, {}, overlap_policy="skip", max_inflight_steps=None)
    skipping.save(1, state, loss=None)
    state.step = 2
    skipping.save(2, state, loss=None)
    decisions["skipped_saves"] = skipping.skipped_saves
    release.set()
    skipping.close()
    decisions["committed_step"] = skipping.last_outcome.step

    # A save past max_inflight_steps=1 blocks due(), and due() reports how long.
    release.clear()
    waiting = _checkpointer(model, optimizer, world_rank, run_uri, {}, max_inflight_steps=1)
    state.step = 3
    waiting.save(3, state, loss=None)
    releaser = threading.Timer(HELD_SAVE_S, release.set)
    releaser.start()
    waiting.due(4)
    releaser.join()
    decisions["due_blocked_s"] = waiting.due_blocked_s
    waiting.close()
    if world_rank == 0:
        _write_evidence(output_dir, decisions)


def _outage_budget_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], output_dir: str) -> None:
    """Save against storage that refuses every connection until the outage budget is spent."""
    model, optimizer, units = _build(world_size)
    state = TrainState()
    checkpointer = _checkpointer(model, optimizer, world_rank, run_uri, options, max_outage_s=3.0,
                                 retry_initial_backoff_s=0.2, max_inflight_steps=None)
    _train_one(model, optimizer, units, world_rank, state)
    checkpointer.save(state.step, state, loss=None)
    try:
        for _ in range(5000):
            _train_one(model, optimizer, units, world_rank, state)
            reason = checkpointer.due(state.step)
            if reason is not None:
                checkpointer.save(state.step, state, loss=None, reason=reason)
    except CheckpointStorageError as error:
        _write_evidence(output_dir + f"/rank{world_rank}", {"error": str(error), "failures": checkpointer.failures,
                                                            "step": state.step})
        return
    raise AssertionError("the outage budget was never exceeded")


# ---------------------------------------------------------------------------
# Helpers of the test process
# ---------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual_bytes = actual.contiguous().reshape(-1).view(torch.uint8)
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual_bytes, expected_bytes), f"{name}: bytes differ"


def assert_states_bitwise_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual["model"]) == sorted(expected["model"])
    for name, tensor in expected["model"].items():
        assert_bitwise_equal(actual["model"][name], tensor, f"model {name}")
    assert sorted(actual["optimizer_state"]) == sorted(expected["optimizer_state"])
    for name, saved in expected["optimizer_state"].items():
        for key, tensor in saved.items():
            assert_bitwise_equal(actual["optimizer_state"][name][key], tensor, f"optimizer {name} {key}")
    assert actual["param_groups"] == expected["param_groups"]


def read_evidence(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / EVIDENCE_FILE).read_text())


def fresh_filesystem(uri: str, options: dict[str, Any]) -> Any:
    fs = filesystem(uri, options)
    fs.invalidate_cache()
    return fs


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_async_save_bitwise_equal(s3_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    run_uri = f"s3://{s3_bucket}/async"
    run_distributed(_async_bitwise_rank, WORLD_SIZE, run_uri, s3_server.storage_options(), str(tmp_path), timeout_s=300)

    evidence = read_evidence(tmp_path)
    assert evidence["in_flight_after_save"], "save() returned only after the write finished"
    assert evidence["committed"]
    assert evidence["loaded_step"] == 2
    at_save = torch.load(tmp_path / "at_save.pt", weights_only=True)
    assert_states_bitwise_equal(torch.load(tmp_path / "loaded.pt", weights_only=True), at_save)
    # The training that overlapped the write changed the parameters: the check above is not vacuous.
    moved = torch.load(tmp_path / "moved.pt", weights_only=True)
    assert any(not torch.equal(moved["model"][name], tensor) for name, tensor in at_save["model"].items())


def scan_for_secrets(texts: dict[str, bytes], secrets: list[str]) -> list[str]:
    """Return 'name: secret' for every text that contains one of ``secrets``."""
    return [f"{name}: {secret}" for name, data in texts.items() for secret in secrets if secret.encode() in data]


def bucket_objects(fs: Any, run_uri: str) -> dict[str, bytes]:
    return {path: fs.cat_file(path) for path in fs.find(run_uri)}


def rank_logs(output_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in output_dir.glob("rank*.log")}


def test_storage_outage_then_retry_commits(private_s3_server: MotoServer, tmp_path: Path) -> None:
    bucket = private_s3_server.create_bucket()
    run_uri = f"s3://{bucket}/outage"
    forwarder_port = free_port()
    # One attempt per request, so a refused connection fails the save in seconds.
    options = {**private_s3_server.storage_options(port=forwarder_port),
               "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"total_max_attempts": 1}}}
    run_distributed(_outage_rank, WORLD_SIZE, run_uri, options, private_s3_server.port, forwarder_port, str(tmp_path),
                    timeout_s=500)

    evidence = read_evidence(tmp_path)
    failed_step, committed_step = evidence["failed_step"], evidence["committed_step"]
    assert evidence["steps_while_failing"] >= 1, "training stopped while the save was failing"
    assert committed_step is not None, "no save committed after the storage came back"
    assert committed_step > evidence["failure_seen_at"]
    options = private_s3_server.storage_options()
    fs = fresh_filesystem(run_uri, options)
    steps = {info.step: info for info in list_checkpoints(fs, run_uri)}
    assert not steps.get(failed_step) or not steps[failed_step].committed, "the failed save left a commit record"
    assert [info.step for info in committed_newest_first(fs, run_uri)] == [committed_step, 1]
    lines, sound = verify_run(run_uri, options)
    assert sound, lines

    log = (tmp_path / "rank0.log").read_text()
    assert f"step={failed_step} checkpoint save failed" in log
    assert "checkpoint storage is back after 1 failed saves" in log
    assert not scan_for_secrets(rank_logs(tmp_path), [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]])


def test_killed_worker_save_never_used(s3_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    run_uri = f"s3://{s3_bucket}/killed"
    options = s3_server.storage_options()
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_distributed(_kill_mid_save_rank, WORLD_SIZE, run_uri, options, timeout_s=300)

    fs = fresh_filesystem(run_uri, options)
    step_2 = {info.step: info for info in list_checkpoints(fs, run_uri)}[2]
    assert not step_2.committed
    (aborted,) = step_2.save_dirs
    assert any(path.endswith(".distcp") for path in fs.find(join(step_2.checkpoint_id, aborted))), "rank 0 wrote no shard"

    run_distributed(_resume_and_resave_rank, WORLD_SIZE, run_uri, options, str(tmp_path), timeout_s=300)
    evidence = read_evidence(tmp_path)
    assert evidence["resumed_from"] == 1
    assert evidence["resumed_step"] == 1
    assert evidence["committed"]
    fs.invalidate_cache()
    record = read_commit_record(fs, checkpoint_uri(run_uri, 2))
    assert record.save_dir != aborted
    assert {info.step: info for info in list_checkpoints(fs, run_uri)}[2].save_dirs == (record.save_dir,)
    lines, sound = verify_run(run_uri, options)
    assert sound, lines


@pytest.fixture(scope="module")
def three_saves(s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A run with committed checkpoints at steps 1, 2 and 3 on S3, and the full state at step 3."""
    bucket = s3_server.create_bucket()
    run_uri = f"s3://{bucket}/three"
    output_dir = tmp_path_factory.mktemp("three-saves")
    options = s3_server.storage_options()
    run_distributed(_save_steps_rank, WORLD_SIZE, run_uri, options, 3, {"every_steps": 1}, str(output_dir), timeout_s=300)
    yield run_uri, options, output_dir
    s3_server.filesystem().rm(bucket, recursive=True)


def copy_run(fs: Any, source_uri: str, target_uri: str) -> None:
    for path in fs.find(source_uri):
        fs.copy(path, target_uri + path.removeprefix(fs._strip_protocol(source_uri)))
    fs.invalidate_cache()


def cli_options(options: dict[str, Any]) -> list[str]:
    return ["--set", f"storage.options={json.dumps(options)}"]


def test_corrupt_checkpoint_falls_back(three_saves: Any, s3_bucket: str, tmp_path: Path, capsys: Any) -> None:
    source_uri, options, _ = three_saves
    run_uri = f"s3://{s3_bucket}/corrupt"
    fs = fresh_filesystem(source_uri, options)
    copy_run(fs, source_uri, run_uri)
    # A byte flipped in rank 1's shard of step 3, and rank 0's shard of step 2 cut short.
    step_3 = save_dir_uri(checkpoint_uri(run_uri, 3), read_commit_record(fs, checkpoint_uri(run_uri, 3)))
    data = bytearray(fs.cat_file(join(step_3, "__1_0.distcp")))
    data[len(data) // 2] ^= 0x01
    write_bytes(fs, join(step_3, "__1_0.distcp"), bytes(data))
    step_2 = save_dir_uri(checkpoint_uri(run_uri, 2), read_commit_record(fs, checkpoint_uri(run_uri, 2)))
    write_bytes(fs, join(step_2, "__0_0.distcp"), fs.cat_file(join(step_2, "__0_0.distcp"))[:-100])
    fs.invalidate_cache()

    assert cli_main(["checkpoints", "verify", run_uri, *cli_options(options)]) == 1
    report = capsys.readouterr().out
    assert "step 1: ok" in report
    assert "step 2: CORRUPT" in report
    assert "__0_0.distcp is" in report
    assert "truncated" in report
    assert "step 3: CORRUPT" in report
    assert "__1_0.distcp has SHA-256" in report

    run_distributed(_resume_and_resave_rank, WORLD_SIZE, run_uri, options, str(tmp_path), timeout_s=300)
    evidence = read_evidence(tmp_path)
    assert evidence["resumed_from"] == 1
    log = (tmp_path / "rank0.log").read_text()
    assert "checkpoint at step 3 failed verification" in log
    assert "__1_0.distcp has SHA-256" in log
    assert "checkpoint at step 2 failed verification" in log
    assert "__0_0.distcp is" in log


class RunsCode:
    """Pickles into a call of os.system: loading it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_code_in_metadata_rejected(three_saves: Any, s3_bucket: str, tmp_path: Path, capsys: Any) -> None:
    source_uri, options, _ = three_saves
    run_uri = f"s3://{s3_bucket}/malicious"
    fs = fresh_filesystem(source_uri, options)
    copy_run(fs, source_uri, run_uri)
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(RunsCode(marker))
    # Control: the payload really runs code when unpickled without restrictions.
    pickle.loads(evil)
    assert marker.exists()
    marker.unlink()

    # Step 1: an attacker with write access replaces .metadata and fixes the commit record to match.
    checkpoint_id = checkpoint_uri(run_uri, 1)
    record = read_commit_record(fs, checkpoint_id)
    write_bytes(fs, join(save_dir_uri(checkpoint_id, record), DCP_METADATA_FILE), evil)
    payload = json.loads(fs.cat_file(join(checkpoint_id, COMMIT_MARKER)))
    payload["files"][DCP_METADATA_FILE] = {"size_bytes": len(evil), "sha256": __import__("hashlib").sha256(evil).hexdigest()}
    write_bytes(fs, join(checkpoint_id, COMMIT_MARKER), json.dumps(payload).encode())
    # Step 2: the same payload without a matching record, padded to the recorded size (pickle ignores
    # bytes after its end), is caught by its checksum.
    checkpoint_2 = checkpoint_uri(run_uri, 2)
    record_2 = read_commit_record(fs, checkpoint_2)
    padded = evil + b"\0" * (record_2.files[DCP_METADATA_FILE].size_bytes - len(evil))
    write_bytes(fs, join(save_dir_uri(checkpoint_2, record_2), DCP_METADATA_FILE), padded)
    fs.invalidate_cache()

    run_distributed(_load_rejected_rank, WORLD_SIZE, checkpoint_id, options, str(tmp_path), timeout_s=300)
    assert "posix.system is not allowed" in read_evidence(tmp_path)["error"]
    assert cli_main(["checkpoints", "verify", run_uri, *cli_options(options)]) == 1
    report = capsys.readouterr().out
    assert "step 1: CORRUPT" in report
    assert "not allowed" in report
    assert "step 2: CORRUPT" in report
    assert ".metadata has SHA-256" in report
    assert cli_main(["checkpoints", "inspect", run_uri, "1", *cli_options(options)]) == 1
    assert not marker.exists(), "unpickling the metadata ran code"


def test_byte_items_loaded_without_code(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from workers.checkpoint_io import SafeLoadPlanner

    marker = tmp_path / "code-ran"
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer)
    buffer.seek(0)
    index = MetadataIndex("optimizer.param_groups.0.lr")
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=index, dest_offsets=torch.Size([0]), storage_index=index,
                    storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(CheckpointIntegrityError, match="optimizer.param_groups.0.lr was rejected"):
        SafeLoadPlanner().load_bytes(item, buffer)
    assert not marker.exists()


def test_export_loads_into_fresh_model(three_saves: Any, tmp_path: Path) -> None:
    import safetensors.torch

    from workers.model import ModelArgs

    run_uri, options, output_dir = three_saves
    export_dir = tmp_path / "export"
    assert cli_main(["checkpoints", "export", run_uri, "-o", str(export_dir), *cli_options(options)]) == 0

    # Loaded with safetensors and json only, as a user without Stalwart would.
    weights = safetensors.torch.load_file(str(export_dir / "model.safetensors"))
    config = json.loads((export_dir / "config.json").read_text())
    assert config["step"] == 3
    assert config["architecture"] == "stalwart-llama"
    fields = {name: config[name] for name in ModelArgs.__dataclass_fields__}
    exported = build_model(ModelArgs(**fields), seed=SEED + 5)
    exported.load_state_dict(weights, strict=True)

    trained = build_model(model_args(CONFIG), seed=SEED + 6)
    trained.load_state_dict(torch.load(output_dir / "final.pt", weights_only=True)["model"], strict=True)
    tokens = torch.randint(0, CONFIG.model.vocab_size, (2, CONFIG.model.seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(exported(tokens), trained(tokens))


def test_list_shows_committed_checkpoints(three_saves: Any, capsys: Any) -> None:
    run_uri, options, _ = three_saves
    assert cli_main(["checkpoints", "list", run_uri, *cli_options(options)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert all(row[1] == "yes" for row in rows)
    assert all(float(row[4]) > 0 for row in rows), "size column"
    assert all(float(row[5]) > 0 for row in rows), "loss column"


def test_three_saves_hold_no_credentials(three_saves: Any) -> None:
    run_uri, options, output_dir = three_saves
    fs = fresh_filesystem(run_uri, options)
    texts = {**bucket_objects(fs, run_uri), **rank_logs(output_dir)}
    assert texts, "nothing to scan"
    assert not scan_for_secrets(texts, [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]])


def test_retention_milestones_many_saves(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "many")
    settings = {"every_steps": 1, "keep_last": 2, "keep_every_steps": 4}
    run_distributed(_save_steps_rank, WORLD_SIZE, run_uri, {}, 12, settings, str(tmp_path), timeout_s=300)

    fs = filesystem(run_uri)
    infos = list_checkpoints(fs, run_uri)
    assert [info.step for info in infos] == [4, 8, 11, 12]
    assert all(info.committed for info in infos)
    assert all(len(info.save_dirs) == 1 for info in infos), "a stale save folder survived"
    lines, sound = verify_run(run_uri, {})
    assert sound, lines


def test_option_credentials_never_stored(s3_server: MotoServer, s3_bucket: str, tmp_path: Path) -> None:
    run_uri = f"s3://{s3_bucket}/credentials"
    key_id, secret = "AKIASTALWARTOPTIONKEY", "stalwart-option-secret-9f1c"
    options = {**s3_server.storage_options(), "key": key_id, "secret": secret}
    saved_config = redact_secrets({**CONFIG.model_dump(mode="json"), "storage": {"uri": "s3://x", "options": options}})
    run_distributed(_save_with_config_rank, WORLD_SIZE, run_uri, options, saved_config, str(tmp_path), timeout_s=300)

    fs = fresh_filesystem(run_uri, options)
    texts = {**bucket_objects(fs, run_uri), **rank_logs(tmp_path)}
    assert any(path.endswith("train_state.json") for path in texts)
    assert not scan_for_secrets(texts, [key_id, secret])

    from workers.checkpoint import describe_error

    message = describe_error(PermissionError(f"denied for {key_id} with {secret}"), options)
    assert key_id not in message
    assert secret not in message
    assert "<redacted>" in message


def test_large_file_uploads_in_parts(s3_server: MotoServer, s3_bucket: str) -> None:
    from workers.checkpoint_io import MIN_PART_BYTES, S3PartUpload

    fs = fresh_filesystem(f"s3://{s3_bucket}", s3_server.storage_options())
    path = f"s3://{s3_bucket}/parts/big.bin"
    data = os.urandom(2 * MIN_PART_BYTES + 12345)
    upload = S3PartUpload(fs, path, part_bytes=MIN_PART_BYTES, concurrency=4)
    # Written in pieces that do not line up with the parts, as torch.save writes.
    for start in range(0, len(data), 3_000_000):
        upload.write(data[start:start + 3_000_000])
    upload.close()

    assert upload.num_parts == 3
    assert upload.entry is not None
    assert upload.entry.size_bytes == len(data)
    assert upload.entry.sha256 == __import__("hashlib").sha256(data).hexdigest()
    # S3 marks an object assembled from N parts with an ETag ending in -N.
    assert fs.info(path)["ETag"].strip('"').endswith("-3")
    assert fs.cat_file(path) == data


def test_one_large_write_buffers_one_part(s3_server: MotoServer, s3_bucket: str) -> None:
    from workers.checkpoint_io import MIN_PART_BYTES, S3PartUpload

    fs = fresh_filesystem(f"s3://{s3_bucket}", s3_server.storage_options())
    path = f"s3://{s3_bucket}/parts/one-write.bin"
    data = os.urandom(2 * MIN_PART_BYTES + 777)
    upload = S3PartUpload(fs, path, part_bytes=MIN_PART_BYTES, concurrency=4)
    upload.write(data)  # one tensor larger than a part, as DCP writes it
    # Two full parts went out; only the 777-byte remainder waits in the buffer.
    assert upload.num_parts == 2
    assert len(upload._buffer) == 777
    upload.close()

    assert upload.num_parts == 3
    assert fs.cat_file(path) == data


def test_small_file_uploads_in_one_put(s3_server: MotoServer, s3_bucket: str) -> None:
    from workers.checkpoint_io import MIN_PART_BYTES, S3PartUpload

    fs = fresh_filesystem(f"s3://{s3_bucket}", s3_server.storage_options())
    path = f"s3://{s3_bucket}/parts/small.bin"
    upload = S3PartUpload(fs, path, part_bytes=MIN_PART_BYTES, concurrency=4)
    upload.write(b"x" * 1000)
    upload.close()

    assert upload.num_parts == 0
    assert "-" not in fs.info(path)["ETag"].strip('"')
    assert fs.cat_file(path) == b"x" * 1000


@pytest.mark.parametrize(("value", "expected"), [("all", "all"), (None, "all"), (4, 4)])
def test_keep_last_accepts_all(value: Any, expected: Any) -> None:
    assert CheckpointSection(keep_last=value).keep_last == expected


@pytest.mark.parametrize("settings", [{"keep_last": 0}, {"keep_last": "some"}, {"upload_part_bytes": 2**20},
                                      {"every_hours": 0}, {"overlap_policy": "queue"}])
def test_checkpoint_settings_rejected(settings: dict[str, Any]) -> None:
    from service.config import ConfigError

    with pytest.raises(ConfigError):
        config_from_dict({"checkpoint": settings})


def test_save_policy_decisions(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "policy")
    run_distributed(_policy_rank, WORLD_SIZE, run_uri, str(tmp_path), timeout_s=300)

    decisions = read_evidence(tmp_path)
    assert decisions["first_polls"] == [None, None]
    assert decisions["time"] == "time"
    assert decisions["requested"] == "stability"
    assert decisions["final"] == "final"
    assert decisions["skipped_saves"] == 1
    assert decisions["committed_step"] == 1
    assert decisions["due_blocked_s"] >= 0.9 * HELD_SAVE_S
    assert "step=2 save (reason=interval) skipped: the save of step 1 is still in flight" in (tmp_path / "rank0.log").read_text()
    assert [info.step for info in list_checkpoints(filesystem(run_uri), run_uri)] == [1, 3]


def test_outage_past_budget_stops_run(tmp_path: Path) -> None:
    # A port that nothing listens on: every request is refused at once.
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "client_kwargs": {"region_name": "us-east-1"},
               "config_kwargs": {"connect_timeout": 2, "retries": {"total_max_attempts": 1}}}
    for rank in range(WORLD_SIZE):
        (tmp_path / f"rank{rank}").mkdir()
    run_distributed(_outage_budget_rank, WORLD_SIZE, "s3://unreachable-bucket/run", options, str(tmp_path), timeout_s=300)

    reports = [read_evidence(tmp_path / f"rank{rank}") for rank in range(WORLD_SIZE)]
    assert reports[0]["step"] == reports[1]["step"], "the ranks stopped at different steps"
    assert reports[0]["step"] > 2, "training stopped before the outage outlasted the budget"
    # Either every attempt failed until 3 s had passed, or one attempt ran longer than 3 s.
    assert "longer than checkpoint.max_outage_s=3" in reports[0]["error"]
    assert reports[0]["error"] == reports[1]["error"]


def test_all_damaged_error_names_fix():
    candidates = [CheckpointInfo(step=step, checkpoint_id=f"/runs/r/checkpoints/{checkpoint_dir_name(step)}", committed=True)
                  for step in (20, 10)]

    def load(checkpoint_id: str) -> None:
        raise CheckpointIntegrityError(f"{checkpoint_id}: " + "x" * 3000)

    with pytest.raises(CheckpointIntegrityError) as raised:
        load_newest_valid(candidates, load, world_rank=0)
    message = str(raised.value)
    assert message.startswith("none of the 2 committed checkpoints passed verification. Run `stalwart checkpoints verify`")
    assert "step 20: /runs/r/checkpoints/step-000000020" in message
