"""DCP checkpoints on a real S3-compatible server (moto on 127.0.0.1), written by 2 gloo ranks.

Ranks run in processes of their own (see dist_helpers). They write what they
saved or loaded to a local folder with ``torch.save``, and the test process
compares those files.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing import ProcessRaisedException

import workers.checkpoint as checkpoint_module
from dist_helpers import run_distributed
from s3_server import MotoServer, TcpForwarder, wait_until_refused
from service.catalog import (
    COMMIT_MARKER,
    DCP_METADATA_FILE,
    SAVE_DIR_PREFIX,
    TRAIN_STATE_FILE,
    checkpoint_uri,
    latest_committed,
    list_checkpoints,
    read_commit_record,
    save_dir_uri,
)
from service.config import config_from_dict
from service.storage import filesystem, join, read_json
from workers.checkpoint import CheckpointSaveError, TrainState, load_checkpoint, save_checkpoint, seed_rank_rng
from workers.checkpoint_io import load_dcp_metadata
from workers.data import MicroBatch
from workers.model import build_model
from workers.parallel import apply_fsdp
from workers.step import train_step
from workers.train_loop import build_optimizer, model_args

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]

WORLD_SIZE = 2
CONFIG = config_from_dict(
    {
        "model": {"n_layers": 2, "dim": 32, "n_heads": 4, "vocab_size": 64, "seq_len": 16},
        "scaling": {"num_workers": WORLD_SIZE},
        "train": {"global_batch": 4, "micro_batch": 2},
    }
)
SEED = 7
RUN_NAME = "tiny-run"
SAVED_STEP = 2
LR = 1e-2
# A rank's traceback when a save failed because the endpoint refused connections.
SAVE_FAILED_OFFLINE = rf"{CheckpointSaveError.__name__}(.|\n)*EndpointConnectionError"
# Bound for a save against unreachable storage. A hang in a collective would end after
# dist_helpers.COLLECTIVE_TIMEOUT_S with another error, which fails the test too.
OUTAGE_TIMEOUT_S = 90.0
# With botocore's default retries a refused request takes 6 to 8 s; one try keeps the outage tests short.
NO_RETRIES = {"retries": {"total_max_attempts": 1}}
# What a 2-rank save writes into its save folder ``step-N/save-<id>/``; COMMITTED sits beside that folder.
SAVE_DIR_FILES = {DCP_METADATA_FILE, "__0_0.distcp", "__1_0.distcp", "rng-00000.json", "rng-00001.json", TRAIN_STATE_FILE}
# Files whose bytes differ between two saves of the same state, with the reason.
SIZE_MAY_DIFFER = {
    DCP_METADATA_FILE: "DCP stores the save folder's path, which differs between s3:// and the local folder",
    TRAIN_STATE_FILE: "holds saved_at, a time.time() float whose printed length varies",
}


# ---------------------------------------------------------------------------
# Code that runs on the ranks
# ---------------------------------------------------------------------------


def _build(world_size: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[Any]]:
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(model_args(CONFIG), seed)
    units = apply_fsdp(model, mesh, param_dtype="float32", reduce_dtype="float32")
    return model, build_optimizer(model, CONFIG), units


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, units: list[Any], world_rank: int, state: TrainState, num_steps: int
) -> None:
    """Run ``num_steps`` optimizer steps on random tokens; the batch depends only on (step, rank)."""
    seq_len, vocab_size = CONFIG.model.seq_len, CONFIG.model.vocab_size
    for step in range(state.step + 1, state.step + num_steps + 1):
        generator = torch.Generator().manual_seed(1000 * step + world_rank)
        tokens = torch.randint(0, vocab_size, (CONFIG.train.micro_batch, seq_len + 1), generator=generator)
        batch = MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=())
        result = train_step(model, optimizer, [batch], lr=LR, grad_clip=1.0, device=torch.device("cpu"), fsdp_units=units)
        assert not result.skipped, f"step {step} was skipped: loss={result.loss} grad_norm={result.grad_norm}"
        state.step = step
        state.tokens_seen += result.target_tokens


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_rank: int) -> dict[str, Any] | None:
    """Gather the unsharded model and optimizer state; a collective that returns the state on rank 0 only."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if world_rank != 0:
        return None
    return {
        "model": model_state,
        "optimizer_state": optimizer_state["state"],
        "param_groups": [
            {key: group[key] for key in ("lr", "betas", "eps", "weight_decay", "params")}
            for group in optimizer_state["param_groups"]
        ],
    }


def _save(
    checkpoint_id: str,
    run_uri: str,
    options: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    world_rank: int,
    world_size: int,
    keep_last: int | str = "all",
) -> None:
    save_checkpoint(
        checkpoint_id, model=model, optimizer=optimizer, train_state=state, run_uri=run_uri,
        config=CONFIG.model_dump(mode="json"), world_rank=world_rank, world_size=world_size,
        storage_options=options, keep_last=keep_last,
    )


def _train_and_save_rank(
    world_rank: int, world_size: int, targets: list[tuple[str, dict[str, Any]]], output_dir: str
) -> None:
    """Train 2 steps, record the full state as reference, then save the same state to every target run."""
    model, optimizer, units = _build(world_size, SEED)
    state = TrainState()
    _train(model, optimizer, units, world_rank, state, SAVED_STEP)

    full = _full_state(model, optimizer, world_rank)
    if full is not None:
        torch.save(full, os.path.join(output_dir, "saved.pt"))
        Path(output_dir, "saved_train_state.json").write_text(json.dumps(state.to_dict()))
    torch.save(torch.get_rng_state(), os.path.join(output_dir, f"saved-rng-rank{world_rank}.pt"))

    for run_uri, options in targets:
        _save(checkpoint_uri(run_uri, state.step), run_uri, options, model, optimizer, state, world_rank, world_size)


def _load_rank(world_rank: int, world_size: int, checkpoint_id: str, options: dict[str, Any], output_dir: str) -> None:
    """Load into a model built from another seed and a fresh optimizer, then record the full state."""
    model, optimizer, _ = _build(world_size, SEED + 1)
    state = load_checkpoint(
        checkpoint_id, model=model, optimizer=optimizer, world_rank=world_rank, world_size=world_size,
        seed=SEED, storage_options=options,
    )
    torch.save(torch.get_rng_state(), os.path.join(output_dir, f"loaded-rng-rank{world_rank}.pt"))

    full = _full_state(model, optimizer, world_rank)
    if full is not None:
        torch.save(full, os.path.join(output_dir, "loaded.pt"))
        Path(output_dir, "loaded_train_state.json").write_text(json.dumps(state.to_dict()))


def _save_then_lose_storage_rank(
    world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], forwarder_pid: int, forwarder_port: int
) -> None:
    """Commit step 1, then save step 2 but stop the storage forwarder just before rank 0 writes COMMITTED."""
    model, optimizer, units = _build(world_size, SEED)
    state = TrainState()
    _train(model, optimizer, units, world_rank, state, 1)
    _save(checkpoint_uri(run_uri, 1), run_uri, options, model, optimizer, state, world_rank, world_size)
    _train(model, optimizer, units, world_rank, state, 1)

    # Fault injection: the real write still runs, against storage that refuses connections.
    write_bytes_to_storage = checkpoint_module.write_bytes

    def write_bytes_after_outage(fs: Any, path: str, data: bytes) -> None:
        if path.endswith("/" + COMMIT_MARKER):
            os.kill(forwarder_pid, signal.SIGTERM)
            wait_until_refused(forwarder_port)
        write_bytes_to_storage(fs, path, data)

    checkpoint_module.write_bytes = write_bytes_after_outage
    _save(checkpoint_uri(run_uri, 2), run_uri, options, model, optimizer, state, world_rank, world_size)


def _resume_and_save_rank(world_rank: int, world_size: int, run_uri: str, options: dict[str, Any]) -> None:
    """Resume from the latest committed checkpoint, train 1 step, save with keep_last=1."""
    model, optimizer, units = _build(world_size, SEED)
    latest = latest_committed(filesystem(run_uri, options), run_uri)
    assert latest is not None, f"no committed checkpoint under {run_uri}"
    state = load_checkpoint(
        latest.checkpoint_id, model=model, optimizer=optimizer, world_rank=world_rank, world_size=world_size,
        seed=SEED, storage_options=options,
    )
    _train(model, optimizer, units, world_rank, state, 1)
    _save(checkpoint_uri(run_uri, state.step), run_uri, options, model, optimizer, state, world_rank, world_size, keep_last=1)


# ---------------------------------------------------------------------------
# Helpers of the test process
# ---------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # Compare bytes, not values: 0.0 == -0.0 would pass a value comparison.
    actual_bytes = actual.contiguous().reshape(-1).view(torch.uint8)
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual_bytes, expected_bytes), f"{name}: bytes differ"


def object_sizes(fs: Any, folder: str) -> dict[str, int]:
    """Return {path relative to ``folder``: size in bytes} of every object or file below ``folder``."""
    prefix = fs._strip_protocol(folder).rstrip("/") + "/"
    return {path.removeprefix(prefix): int(info["size"]) for path, info in fs.find(folder, detail=True).items()}


def committed_save_dir(fs: Any, checkpoint_id: str) -> str:
    """Return the URI of the save folder that the checkpoint's commit record names."""
    return save_dir_uri(checkpoint_id, read_commit_record(fs, checkpoint_id))


def save_dirs(fs: Any, checkpoint_id: str) -> list[str]:
    """Return the URIs of every save folder in a step folder, committed or not."""
    names = [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(checkpoint_id, detail=False, refresh=True)]
    return sorted(join(checkpoint_id, name) for name in names if name.startswith(SAVE_DIR_PREFIX))


def fresh_filesystem(uri: str, options: dict[str, Any]) -> Any:
    """Return the project's filesystem for ``uri`` with its listing cache cleared, because ranks wrote meanwhile."""
    fs = filesystem(uri, options)
    fs.invalidate_cache()
    return fs


@dataclass(frozen=True)
class SavedCheckpoint:
    run_uri: str
    checkpoint_id: str
    local_checkpoint_id: str
    storage_options: dict[str, Any]
    reference_dir: Path


@pytest.fixture(scope="module")
def saved_checkpoint(s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One 2-rank training run saved at step 2 to a new bucket and, with the same state, to a local folder."""
    bucket = s3_server.create_bucket()
    run_uri = f"s3://{bucket}/{RUN_NAME}"
    local_run_uri = join(str(tmp_path_factory.mktemp("local-storage")), RUN_NAME)
    reference_dir = tmp_path_factory.mktemp("reference")
    options = s3_server.storage_options()

    run_distributed(_train_and_save_rank, WORLD_SIZE, [(run_uri, options), (local_run_uri, {})], str(reference_dir))
    yield SavedCheckpoint(
        run_uri=run_uri,
        checkpoint_id=checkpoint_uri(run_uri, SAVED_STEP),
        local_checkpoint_id=checkpoint_uri(local_run_uri, SAVED_STEP),
        storage_options=options,
        reference_dir=reference_dir,
    )
    s3_server.filesystem().rm(bucket, recursive=True)


@pytest.fixture(scope="module")
def load_saved_checkpoint(saved_checkpoint: SavedCheckpoint, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Return a function that loads the saved checkpoint at a world size (once per size) and returns the output folder."""
    output_dirs: dict[int, Path] = {}

    def load(world_size: int) -> Path:
        if world_size not in output_dirs:
            output_dir = tmp_path_factory.mktemp(f"loaded-world-size-{world_size}")
            run_distributed(
                _load_rank, world_size, saved_checkpoint.checkpoint_id, saved_checkpoint.storage_options, str(output_dir)
            )
            output_dirs[world_size] = output_dir
        return output_dirs[world_size]

    return load


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_s3_round_trip_bitwise(saved_checkpoint: SavedCheckpoint, load_saved_checkpoint: Any, world_size: int) -> None:
    output_dir = load_saved_checkpoint(world_size)
    saved = torch.load(saved_checkpoint.reference_dir / "saved.pt", weights_only=True)
    loaded = torch.load(output_dir / "loaded.pt", weights_only=True)

    assert sorted(loaded["model"]) == sorted(saved["model"])
    for name, tensor in saved["model"].items():
        assert_bitwise_equal(loaded["model"][name], tensor, f"model {name}")

    assert sorted(loaded["optimizer_state"]) == sorted(saved["optimizer_state"])
    for name, saved_state in saved["optimizer_state"].items():
        assert set(saved_state) == {"step", "exp_avg", "exp_avg_sq"}, f"optimizer state keys of {name}"
        assert set(loaded["optimizer_state"][name]) == set(saved_state), f"optimizer state keys of {name}"
        for key, tensor in saved_state.items():
            assert_bitwise_equal(loaded["optimizer_state"][name][key], tensor, f"optimizer {name} {key}")
        assert float(saved_state["step"]) == SAVED_STEP
    assert loaded["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_s3_round_trip_train_state(saved_checkpoint: SavedCheckpoint, load_saved_checkpoint: Any, world_size: int) -> None:
    output_dir = load_saved_checkpoint(world_size)
    saved = json.loads((saved_checkpoint.reference_dir / "saved_train_state.json").read_text())
    loaded = json.loads((output_dir / "loaded_train_state.json").read_text())
    assert loaded == saved
    assert loaded["step"] == SAVED_STEP


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_s3_round_trip_rng(saved_checkpoint: SavedCheckpoint, load_saved_checkpoint: Any, world_size: int) -> None:
    """Same world size: each rank gets its saved RNG state back; another world size: a stream from the seed."""
    output_dir = load_saved_checkpoint(world_size)
    states = [torch.load(output_dir / f"loaded-rng-rank{rank}.pt", weights_only=True) for rank in range(world_size)]
    if world_size != WORLD_SIZE:
        # Streams derived for a new world size are distinct per rank.
        assert len({bytes(state.numpy()) for state in states}) == world_size, "two ranks share an RNG stream"
    for world_rank in range(world_size):
        loaded = states[world_rank]
        if world_size == WORLD_SIZE:
            expected = torch.load(saved_checkpoint.reference_dir / f"saved-rng-rank{world_rank}.pt", weights_only=True)
        else:
            with torch.random.fork_rng(devices=[]):
                seed_rank_rng(SEED, SAVED_STEP, world_rank, world_size)
                expected = torch.get_rng_state()
        assert_bitwise_equal(loaded, expected, f"RNG state of rank {world_rank}")


def test_s3_checkpoint_committed(saved_checkpoint: SavedCheckpoint) -> None:
    fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    checkpoint_id = saved_checkpoint.checkpoint_id

    assert fs.exists(join(checkpoint_id, COMMIT_MARKER))
    record = read_commit_record(fs, checkpoint_id)
    assert record.step == SAVED_STEP
    assert record.world_size == WORLD_SIZE
    assert set(record.files) == SAVE_DIR_FILES

    train_state = read_json(fs, join(save_dir_uri(checkpoint_id, record), TRAIN_STATE_FILE))
    assert train_state["train_state"]["step"] == SAVED_STEP
    assert train_state["world_size"] == WORLD_SIZE
    assert train_state["config"] == CONFIG.model_dump(mode="json")

    latest = latest_committed(fs, saved_checkpoint.run_uri)
    assert latest is not None
    assert latest.step == SAVED_STEP
    assert latest.checkpoint_id == checkpoint_id


def test_s3_objects_match_commit_record(saved_checkpoint: SavedCheckpoint) -> None:
    fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    checkpoint_id = saved_checkpoint.checkpoint_id
    record = read_commit_record(fs, checkpoint_id)

    # The step folder holds the record and the one save folder, and nothing else (leases live elsewhere).
    save_dir_prefix = f"{record.save_dir}/"
    step_objects = object_sizes(fs, checkpoint_id)
    assert {name for name in step_objects if not name.startswith(save_dir_prefix)} == {COMMIT_MARKER}

    s3_sizes = {name.removeprefix(save_dir_prefix): size for name, size in step_objects.items() if name.startswith(save_dir_prefix)}
    assert set(s3_sizes) == set(record.files)
    for name, entry in record.files.items():
        assert s3_sizes[name] == entry.size_bytes, f"{name}: {s3_sizes[name]} bytes on S3, {entry.size_bytes} in the commit record"


def test_s3_objects_match_local_files(saved_checkpoint: SavedCheckpoint) -> None:
    s3_fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    local_fs = filesystem(saved_checkpoint.local_checkpoint_id)
    s3_folder = committed_save_dir(s3_fs, saved_checkpoint.checkpoint_id)
    local_folder = committed_save_dir(local_fs, saved_checkpoint.local_checkpoint_id)
    s3_sizes = object_sizes(s3_fs, s3_folder)
    local_sizes = object_sizes(local_fs, local_folder)

    assert set(s3_sizes) == SAVE_DIR_FILES
    assert set(local_sizes) == SAVE_DIR_FILES
    for name in sorted(SAVE_DIR_FILES - set(SIZE_MAY_DIFFER)):
        assert s3_sizes[name] == local_sizes[name], f"{name}: {s3_sizes[name]} bytes on S3, {local_sizes[name]} locally"

    # .metadata differs in the stored path only: every item must sit at the same place in the same shard.
    s3_metadata = load_dcp_metadata(s3_fs.cat_file(join(s3_folder, DCP_METADATA_FILE)), s3_folder)
    local_metadata = load_dcp_metadata(local_fs.cat_file(join(local_folder, DCP_METADATA_FILE)), local_folder)
    assert s3_metadata.storage_data == local_metadata.storage_data


def test_s3_metadata_ranges_fit_shards(saved_checkpoint: SavedCheckpoint) -> None:
    fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    folder = committed_save_dir(fs, saved_checkpoint.checkpoint_id)
    shard_sizes = {name: size for name, size in object_sizes(fs, folder).items() if name.endswith(".distcp")}
    metadata = load_dcp_metadata(fs.cat_file(join(folder, DCP_METADATA_FILE)), folder)
    assert metadata.storage_data, "the .metadata file lists no stored items"

    ranges_by_shard: dict[str, list[tuple[int, int]]] = {name: [] for name in shard_sizes}
    for index, info in metadata.storage_data.items():
        assert info.relative_path in shard_sizes, f"{index.fqn} points to missing object {info.relative_path}"
        assert info.offset >= 0, f"{index.fqn}: offset {info.offset}"
        assert info.length > 0, f"{index.fqn}: length {info.length}"
        end = info.offset + info.length
        size = shard_sizes[info.relative_path]
        assert end <= size, f"{index.fqn}: bytes {info.offset}..{end} exceed {info.relative_path} ({size} bytes)"
        ranges_by_shard[info.relative_path].append((info.offset, end))

    for name, ranges in ranges_by_shard.items():
        assert ranges, f"no item of .metadata is stored in {name}"
        ranges.sort()
        for (_, previous_end), (start, _) in zip(ranges, ranges[1:]):
            assert start >= previous_end, f"{name}: items overlap at byte {start}"


def test_latest_committed_on_s3(s3_server: MotoServer, s3_bucket: str) -> None:
    """On S3 listings, "latest" is the highest committed step by number; step-10 sorts before step-9 as text."""
    run_uri = f"s3://{s3_bucket}/{RUN_NAME}"
    root = join(run_uri, "checkpoints")
    fs = fresh_filesystem(run_uri, s3_server.storage_options())
    fs.pipe({
        join(root, "step-9", COMMIT_MARKER): b"{}",
        join(root, "step-9", "save-a", DCP_METADATA_FILE): b"",
        join(root, "step-10", COMMIT_MARKER): b"{}",
        join(root, "step-10", "save-b", DCP_METADATA_FILE): b"",
        join(root, "step-11", "save-c", DCP_METADATA_FILE): b"",  # not committed
    })
    fs.invalidate_cache()

    infos = list_checkpoints(fs, run_uri)
    assert [info.step for info in infos] == [9, 10, 11]
    assert [info.committed for info in infos] == [True, True, False]
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 10


def test_stopped_server_save_raises(private_s3_server: MotoServer, tmp_path: Path) -> None:
    """A save against a stopped server fails on every rank within the time bound instead of hanging."""
    bucket = private_s3_server.create_bucket()
    run_uri = f"s3://{bucket}/{RUN_NAME}"
    options = private_s3_server.storage_options(config_kwargs=NO_RETRIES)
    private_s3_server.stop()

    started = time.monotonic()
    with pytest.raises(ProcessRaisedException, match=SAVE_FAILED_OFFLINE):
        run_distributed(
            _train_and_save_rank, WORLD_SIZE, [(run_uri, options)], str(tmp_path), timeout_s=OUTAGE_TIMEOUT_S
        )
    elapsed_s = time.monotonic() - started

    # moto keeps objects in memory, so the restarted server starts empty: this
    # only shows nothing was committed. test_outage_before_commit_keeps_previous
    # covers storage that keeps its objects through the outage.
    private_s3_server.start()
    private_s3_server.create_bucket(bucket)
    fs = fresh_filesystem(run_uri, options)
    assert not fs.exists(join(checkpoint_uri(run_uri, SAVED_STEP), COMMIT_MARKER))
    assert latest_committed(fs, run_uri) is None
    assert elapsed_s < OUTAGE_TIMEOUT_S


def test_outage_before_commit_keeps_previous(private_s3_server: MotoServer, tmp_path: Path) -> None:
    """Storage lost just before COMMITTED: that step stays uncommitted, the older one stays latest, a retry commits."""
    bucket = private_s3_server.create_bucket()
    run_uri = f"s3://{bucket}/{RUN_NAME}"
    step_2 = checkpoint_uri(run_uri, 2)
    # The ranks reach moto through the forwarder; stopping it cuts them off while moto keeps the objects.
    forwarder = TcpForwarder(tmp_path / "forwarder.log", target_port=private_s3_server.port)
    forwarder.start()
    try:
        started = time.monotonic()
        with pytest.raises(ProcessRaisedException, match=SAVE_FAILED_OFFLINE):
            run_distributed(
                _save_then_lose_storage_rank, WORLD_SIZE, run_uri,
                private_s3_server.storage_options(port=forwarder.port, config_kwargs=NO_RETRIES),
                forwarder.pid, forwarder.port, timeout_s=OUTAGE_TIMEOUT_S,
            )
        assert time.monotonic() - started < OUTAGE_TIMEOUT_S
    finally:
        forwarder.stop()

    options = private_s3_server.storage_options()
    fs = fresh_filesystem(run_uri, options)
    [failed_save_dir] = save_dirs(fs, step_2)
    assert set(object_sizes(fs, failed_save_dir)) == SAVE_DIR_FILES, "every file but the record was written"
    assert not fs.exists(join(step_2, COMMIT_MARKER))
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 1

    run_distributed(_resume_and_save_rank, WORLD_SIZE, run_uri, options)

    fs.invalidate_cache()
    assert save_dirs(fs, step_2) == [committed_save_dir(fs, step_2)], "the failed attempt's folder is removed"
    assert committed_save_dir(fs, step_2) != failed_save_dir
    assert set(object_sizes(fs, committed_save_dir(fs, step_2))) == SAVE_DIR_FILES
    # keep_last=1: step 1 is deleted once step 2 is committed.
    assert [info.step for info in list_checkpoints(fs, run_uri)] == [2]
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 2
