"""DCP checkpoints on a real S3-compatible server (moto on 127.0.0.1), written by 2 gloo ranks.

Ranks run in spawned processes. They write what they saved or loaded to a
local folder with ``torch.save``, and the test process compares those files.
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
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing import ProcessRaisedException

import workers.checkpoint as checkpoint_module
from dist_helpers import run_distributed
from s3_server import MotoServer
from service.catalog import (
    COMMIT_MARKER,
    DCP_METADATA_FILE,
    TRAIN_STATE_FILE,
    checkpoint_uri,
    latest_committed,
    list_checkpoints,
)
from service.config import config_from_dict
from service.storage import filesystem, join, read_json
from workers.checkpoint import TrainState, load_checkpoint, save_checkpoint, seed_rank_rng
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
# Every shard a 2-rank save writes; train_state.json and COMMITTED come on top.
DCP_AND_RNG_FILES = {DCP_METADATA_FILE, "__0_0.distcp", "__1_0.distcp", "rng/rank-00000.json", "rng/rank-00001.json"}
# Files whose bytes differ between two saves of the same state, with the reason:
SIZE_MAY_DIFFER = {
    DCP_METADATA_FILE: "DCP stores the checkpoint path, which differs between s3:// and the local folder",
    TRAIN_STATE_FILE: "holds saved_at, a time.time() float whose printed length varies",
    COMMIT_MARKER: "holds committed_at, a time.time() float whose printed length varies",
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
    keep_last: int | None = None,
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


def _save_then_freeze_storage_rank(
    world_rank: int, world_size: int, run_uri: str, options: dict[str, Any], server_pid: int
) -> None:
    """Commit step 1, then save step 2 but freeze the server just before rank 0 writes train_state.json."""
    model, optimizer, units = _build(world_size, SEED)
    state = TrainState()
    _train(model, optimizer, units, world_rank, state, 1)
    _save(checkpoint_uri(run_uri, 1), run_uri, options, model, optimizer, state, world_rank, world_size)
    _train(model, optimizer, units, world_rank, state, 1)

    # Fault injection: the real write still runs, against a server that no longer answers.
    unfrozen_write_json = checkpoint_module.write_json

    def write_json_after_freezing(fs: Any, path: str, payload: Any) -> None:
        if path.endswith("/" + TRAIN_STATE_FILE):
            os.kill(server_pid, signal.SIGSTOP)
        unfrozen_write_json(fs, path, payload)

    checkpoint_module.write_json = write_json_after_freezing
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


@pytest.mark.parametrize("world_size", [1, 2])
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


@pytest.mark.parametrize("world_size", [1, 2])
def test_s3_round_trip_train_state(saved_checkpoint: SavedCheckpoint, load_saved_checkpoint: Any, world_size: int) -> None:
    output_dir = load_saved_checkpoint(world_size)
    saved = json.loads((saved_checkpoint.reference_dir / "saved_train_state.json").read_text())
    loaded = json.loads((output_dir / "loaded_train_state.json").read_text())
    assert loaded == saved
    assert loaded["step"] == SAVED_STEP


@pytest.mark.parametrize("world_size", [1, 2])
def test_s3_round_trip_rng(saved_checkpoint: SavedCheckpoint, load_saved_checkpoint: Any, world_size: int) -> None:
    """Same world size: each rank gets its saved RNG state back; another world size: a stream from the seed."""
    output_dir = load_saved_checkpoint(world_size)
    for world_rank in range(world_size):
        loaded = torch.load(output_dir / f"loaded-rng-rank{world_rank}.pt", weights_only=True)
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
    marker = read_json(fs, join(checkpoint_id, COMMIT_MARKER))
    assert marker["step"] == SAVED_STEP
    assert marker["world_size"] == WORLD_SIZE

    train_state = read_json(fs, join(checkpoint_id, TRAIN_STATE_FILE))
    assert train_state["train_state"]["step"] == SAVED_STEP
    assert train_state["world_size"] == WORLD_SIZE
    assert train_state["config"] == CONFIG.model_dump(mode="json")

    latest = latest_committed(fs, saved_checkpoint.run_uri)
    assert latest is not None
    assert latest.step == SAVED_STEP
    assert latest.checkpoint_id == checkpoint_id


def test_s3_objects_match_local_files(saved_checkpoint: SavedCheckpoint) -> None:
    s3_fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    s3_sizes = object_sizes(s3_fs, saved_checkpoint.checkpoint_id)
    local_sizes = object_sizes(filesystem(saved_checkpoint.local_checkpoint_id), saved_checkpoint.local_checkpoint_id)

    assert set(s3_sizes) == DCP_AND_RNG_FILES | {TRAIN_STATE_FILE, COMMIT_MARKER}
    assert set(s3_sizes) == set(local_sizes)
    for name in sorted(set(s3_sizes) - set(SIZE_MAY_DIFFER)):
        assert s3_sizes[name] == local_sizes[name], f"{name}: {s3_sizes[name]} bytes on S3, {local_sizes[name]} locally"

    # .metadata differs in the stored path only: every item must sit at the same place in the same shard.
    # NOTE: read_metadata unpickles .metadata; this test wrote both files itself.
    s3_metadata = FsspecReader(saved_checkpoint.checkpoint_id, **saved_checkpoint.storage_options).read_metadata()
    local_metadata = FsspecReader(saved_checkpoint.local_checkpoint_id).read_metadata()
    assert s3_metadata.storage_data == local_metadata.storage_data


def test_s3_metadata_ranges_fit_shards(saved_checkpoint: SavedCheckpoint) -> None:
    fs = fresh_filesystem(saved_checkpoint.run_uri, saved_checkpoint.storage_options)
    shard_sizes = {
        name: size
        for name, size in object_sizes(fs, saved_checkpoint.checkpoint_id).items()
        if name.endswith(".distcp")
    }
    metadata = FsspecReader(saved_checkpoint.checkpoint_id, **saved_checkpoint.storage_options).read_metadata()
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


def test_latest_skips_uncommitted_on_s3(s3_server: MotoServer, s3_bucket: str) -> None:
    run_uri = f"s3://{s3_bucket}/{RUN_NAME}"
    fs = fresh_filesystem(run_uri, s3_server.storage_options())
    fs.pipe({
        join(checkpoint_uri(run_uri, 8), COMMIT_MARKER): b"{}",  # committed, but DCP metadata is missing
        join(checkpoint_uri(run_uri, 9), DCP_METADATA_FILE): b"",
        join(checkpoint_uri(run_uri, 9), COMMIT_MARKER): b"{}",
        join(checkpoint_uri(run_uri, 10), DCP_METADATA_FILE): b"",  # not committed
    })
    fs.invalidate_cache()

    assert [info.step for info in list_checkpoints(fs, run_uri)] == [8, 9, 10]
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 9


def test_stopped_server_save_raises(private_s3_server: MotoServer) -> None:
    """A save against a stopped server fails within the time bound instead of hanging."""
    bucket = private_s3_server.create_bucket()
    run_uri = f"s3://{bucket}/{RUN_NAME}"
    options = private_s3_server.storage_options()
    private_s3_server.stop()

    started = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="EndpointConnectionError|Could not connect"):
        run_distributed(_train_and_save_rank, WORLD_SIZE, [(run_uri, options)], str(private_s3_server.log_path.parent), timeout_s=90)
    elapsed_s = time.monotonic() - started

    # moto keeps objects in memory, so the restarted server starts empty: this
    # only shows nothing was committed. The frozen-server test covers a server
    # that keeps its objects.
    private_s3_server.start()
    private_s3_server.create_bucket(bucket)
    fs = fresh_filesystem(run_uri, options)
    assert not fs.exists(join(checkpoint_uri(run_uri, SAVED_STEP), COMMIT_MARKER))
    assert latest_committed(fs, run_uri) is None
    assert elapsed_s < 90


def test_frozen_server_leaves_checkpoint_uncommitted(private_s3_server: MotoServer) -> None:
    """Storage that stops answering mid-save leaves that checkpoint uncommitted; a retry replaces it."""
    bucket = private_s3_server.create_bucket()
    run_uri = f"s3://{bucket}/{RUN_NAME}"
    # Short timeouts so the frozen server fails the write in seconds, not minutes.
    options = private_s3_server.storage_options(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})
    step_2 = checkpoint_uri(run_uri, 2)

    try:
        with pytest.raises(ProcessRaisedException, match="(?i)timeout|timed out"):
            run_distributed(_save_then_freeze_storage_rank, WORLD_SIZE, run_uri, options, private_s3_server.pid, timeout_s=120)
    finally:
        private_s3_server.resume()

    fs = fresh_filesystem(run_uri, options)
    # The DCP part had finished before the freeze. train_state.json may or may
    # not exist: the server can still process a request it buffered while frozen.
    assert DCP_AND_RNG_FILES <= set(object_sizes(fs, step_2))
    assert not fs.exists(join(step_2, COMMIT_MARKER))
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 1

    # A stray object from the failed attempt must not survive the retry at the same step.
    fs.pipe_file(join(step_2, "__7_0.distcp"), b"stale shard")
    run_distributed(_resume_and_save_rank, WORLD_SIZE, run_uri, options)

    fs.invalidate_cache()
    assert set(object_sizes(fs, step_2)) == DCP_AND_RNG_FILES | {TRAIN_STATE_FILE, COMMIT_MARKER}
    # keep_last=1: step 1 is deleted once step 2 is committed.
    assert [info.step for info in list_checkpoints(fs, run_uri)] == [2]
    latest = latest_committed(fs, run_uri)
    assert latest is not None
    assert latest.step == 2
