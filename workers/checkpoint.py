"""Sharded checkpoint save and load with torch.distributed.checkpoint over fsspec.

Every rank writes its shards; rank 0 writes the train state and then the commit
marker, after ``dcp.save`` has returned (which happens only once every rank's
write results were gathered). ``s3://`` works exactly like a local path.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from service.catalog import COMMIT_MARKER, TRAIN_STATE_FILE, apply_retention
from service.storage import filesystem, join, read_json, write_json

logger = logging.getLogger(__name__)

RNG_DIR = "rng"


@dataclass
class TrainState:
    """What besides model and optimizer a resume needs; saved as JSON by rank 0."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    overflow_steps: int = 0
    # Batch ranges skipped by rollbacks: [[first_batch, count], ...] (see workers.stability.DataSkips).
    data_skips: list[list[int]] = field(default_factory=list)
    stability: dict[str, Any] = field(default_factory=dict)
    loss_scaler: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "TrainState":
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in payload.items() if key in known})


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_file(checkpoint_id: str, world_rank: int) -> str:
    return join(checkpoint_id, RNG_DIR, f"rank-{world_rank:05d}.json")


def rng_state_payload() -> dict[str, str]:
    # Stored as base64 text, never pickled, so loading it cannot run code.
    payload = {"torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available():
        payload["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return payload


def restore_rng_state(payload: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(payload["torch_cpu"])), dtype=torch.uint8))
    if "torch_cuda" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(payload["torch_cuda"])), dtype=torch.uint8))


def seed_rank_rng(seed: int, step: int, world_rank: int, world_size: int) -> None:
    """Give this rank a distinct, deterministic RNG stream derived from (seed, step, rank, world size)."""
    entropy = np.random.SeedSequence([seed, step, world_rank, world_size]).generate_state(1, np.uint64)[0]
    torch.manual_seed(int(entropy) & 0x7FFF_FFFF_FFFF_FFFF)


def save_checkpoint(
    checkpoint_id: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: TrainState,
    run_uri: str,
    config: dict[str, Any],
    world_rank: int,
    world_size: int,
    storage_options: dict[str, Any],
    keep_last: int | None,
    extra: dict[str, Any] | None = None,
) -> float:
    """Save and commit a checkpoint from every rank; return the seconds it took.

    A folder left by an aborted attempt at the same step is removed first, so
    no stale shard or marker can mix with the new ones.
    """
    started = time.monotonic()
    fs = filesystem(checkpoint_id, storage_options)
    if world_rank == 0 and fs.exists(checkpoint_id):
        logger.warning("removing leftover folder %s before saving", checkpoint_id)
        fs.rm(checkpoint_id, recursive=True)
    _barrier()

    write_json(fs, _rank_file(checkpoint_id, world_rank), rng_state_payload())
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state},
        storage_writer=FsspecWriter(checkpoint_id, **storage_options),
    )

    if world_rank == 0:
        committed_at = time.time()
        write_json(
            fs,
            join(checkpoint_id, TRAIN_STATE_FILE),
            {"train_state": train_state.to_dict(), "world_size": world_size, "config": config, "saved_at": committed_at, **(extra or {})},
        )
        # The marker goes last: a checkpoint without it is never loaded.
        write_json(fs, join(checkpoint_id, COMMIT_MARKER), {"step": train_state.step, "committed_at": committed_at, "world_size": world_size})
        apply_retention(fs, run_uri, keep_last)
    _barrier()
    return time.monotonic() - started


def load_checkpoint(
    checkpoint_id: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world_rank: int,
    world_size: int,
    seed: int,
    storage_options: dict[str, Any],
) -> TrainState:
    """Load model, optimizer and train state at the current world size (DCP reshards as needed).

    RNG: a rank at the saved world size gets its own saved stream back; at a
    new world size every rank gets a distinct stream derived from the seed.
    """
    fs = filesystem(checkpoint_id, storage_options)
    saved = read_json(fs, join(checkpoint_id, TRAIN_STATE_FILE))
    train_state = TrainState.from_dict(saved["train_state"])

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=FsspecReader(checkpoint_id, **storage_options))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    rank_file = _rank_file(checkpoint_id, world_rank)
    if saved.get("world_size") == world_size and fs.exists(rank_file):
        restore_rng_state(read_json(fs, rank_file))
    else:
        seed_rank_rng(seed, train_state.step, world_rank, world_size)
    return train_state
