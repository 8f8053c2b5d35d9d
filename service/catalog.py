"""Checkpoint catalog: which checkpoints of a run exist, which are committed, and retention.

Layout of a run in storage::

    <storage>/<run>/checkpoints/step-000000100/
        .metadata, __0_0.distcp, ...   DCP sharded model and optimizer state
        rng/rank-00000.json ...        per-rank RNG state
        train_state.json               step, tokens seen, config
        COMMITTED                      written last, after every rank finished

A checkpoint counts only once ``COMMITTED`` exists. "Latest" is the highest
committed step by number, never by text order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import fsspec

from service.storage import join

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
COMMIT_MARKER = "COMMITTED"
TRAIN_STATE_FILE = "train_state.json"
DCP_METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    checkpoint_id: str  # URI of the step-NNNNNNNNN folder
    committed: bool
    has_metadata: bool

    @property
    def usable(self) -> bool:
        return self.committed and self.has_metadata


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_uri(run_uri: str) -> str:
    return join(run_uri, CHECKPOINTS_DIR)


def checkpoint_uri(run_uri: str, step: int) -> str:
    return join(checkpoints_uri(run_uri), checkpoint_dir_name(step))


def parse_step(name: str) -> int | None:
    """Return the step of a ``step-NNN`` folder name, or None for any other name."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def list_checkpoints(fs: fsspec.AbstractFileSystem, run_uri: str) -> list[CheckpointInfo]:
    """List the run's checkpoint folders, sorted by step number."""
    root = checkpoints_uri(run_uri)
    # Other processes write checkpoints, so bypass the listing cache that s3fs keeps per filesystem instance.
    try:
        entries = fs.ls(root, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    found: list[CheckpointInfo] = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        step = parse_step(name)
        if step is None:
            continue
        # The folder's own name: parse_step also accepts unpadded names such as step-9000.
        uri = join(root, name)
        # One listing per folder, instead of one exists() call per file.
        names = {item.rstrip("/").rsplit("/", 1)[-1] for item in fs.ls(uri, detail=False, refresh=True)}
        found.append(
            CheckpointInfo(
                step=step,
                checkpoint_id=uri,
                committed=COMMIT_MARKER in names,
                has_metadata=DCP_METADATA_FILE in names,
            )
        )
    return sorted(found, key=lambda info: info.step)


def latest_committed(fs: fsspec.AbstractFileSystem, run_uri: str) -> CheckpointInfo | None:
    """Return the committed checkpoint with the highest step; warn about newer incomplete ones."""
    latest: CheckpointInfo | None = None
    for info in reversed(list_checkpoints(fs, run_uri)):
        if info.usable:
            latest = info
            break
        reason = "no commit marker" if not info.committed else f"no {DCP_METADATA_FILE}"
        logger.warning("skipping incomplete checkpoint %s (%s)", info.checkpoint_id, reason)
    return latest


def apply_retention(fs: fsspec.AbstractFileSystem, run_uri: str, keep_last: int | None) -> list[int]:
    """Delete committed checkpoints older than the newest ``keep_last``; return the deleted steps.

    Call only after the newest checkpoint is committed. Uncommitted folders are left alone.
    """
    if keep_last is None:
        return []
    committed = [info for info in list_checkpoints(fs, run_uri) if info.usable]
    doomed = committed[:-keep_last] if len(committed) > keep_last else []
    deleted: list[int] = []
    for info in doomed:
        # Remove the marker first: a delete interrupted halfway leaves an
        # uncommitted folder, which no loader reads.
        fs.rm(join(info.checkpoint_id, COMMIT_MARKER))
        fs.rm(info.checkpoint_id, recursive=True)
        deleted.append(info.step)
    if deleted:
        logger.info("retention deleted checkpoints at steps %s (keep_last=%d)", deleted, keep_last)
    return deleted
