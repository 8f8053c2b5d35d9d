"""Checkpoint catalog: layout, commit records, listing, retention and load leases.

Layout of a run in storage::

    <storage>/<run>/checkpoints/step-000000100/
        save-<save_id>/                 one folder per save attempt
            .metadata, __0_0.distcp ... DCP metadata and one shard file per rank
            rng-00000.json ...          per-rank RNG state
            train_state.json            step, tokens seen, loss, config (secrets redacted)
        COMMITTED                       commit record, written last by rank 0
    <storage>/<run>/checkpoints/leases/step-000000100.<id>.json
                                        held while a process loads that checkpoint

A checkpoint counts only once ``COMMITTED`` exists. The record names the one
save folder that belongs to the checkpoint and lists every file in it with its
size and SHA-256, so files of an aborted attempt are never read. "Latest" is
the highest committed step by number, never by text order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec

from service.storage import join, write_json

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LEASES_DIR = "leases"
COMMIT_MARKER = "COMMITTED"
TRAIN_STATE_FILE = "train_state.json"
DCP_METADATA_FILE = ".metadata"
SAVE_DIR_PREFIX = "save-"
RECORD_FORMAT = "stalwart-checkpoint"
RECORD_VERSION = 2
KEEP_ALL = "all"
# A crashed loader's lease blocks deletion of its checkpoint for this long.
LEASE_DURATION_S = 3600.0
HASH_CHUNK_BYTES = 16 * 2**20
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEASE_FILE = re.compile(r"^step-(\d+)\.[0-9a-f]+\.json$")

KeepLast = int | Literal["all"] | None


class CheckpointIntegrityError(Exception):
    """A checkpoint's files do not match its commit record; loaders fall back to an older checkpoint."""


@dataclass(frozen=True)
class FileEntry:
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class CommitRecord:
    """The parsed ``COMMITTED`` file of one checkpoint."""

    step: int
    save_dir: str  # name of the save folder inside the step folder
    world_size: int
    committed_at: float  # seconds since the epoch
    files: dict[str, FileEntry]  # path relative to the save folder -> size and checksum
    loss: float | None = None
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "step": self.step,
            "save_dir": self.save_dir,
            "world_size": self.world_size,
            "committed_at": self.committed_at,
            "loss": self.loss,
            "reason": self.reason,
            "total_bytes": self.total_bytes,
            "files": {name: {"size_bytes": entry.size_bytes, "sha256": entry.sha256} for name, entry in sorted(self.files.items())},
            **self.extra,
        }

    @classmethod
    def from_json(cls, payload: Any, source: str) -> "CommitRecord":
        """Validate a decoded commit record; raise ``CheckpointIntegrityError`` naming ``source`` when it is malformed."""
        if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
            raise CheckpointIntegrityError(
                f"{source} is not a Stalwart commit record (no format={RECORD_FORMAT!r}); it was written by an "
                "older version or by something else, and cannot be verified"
            )
        try:
            files = {
                str(name): FileEntry(int(entry["size_bytes"]), str(entry["sha256"]))
                for name, entry in payload["files"].items()
            }
            save_dir = str(payload["save_dir"])
            record = cls(
                step=int(payload["step"]), save_dir=save_dir, world_size=int(payload["world_size"]),
                committed_at=float(payload["committed_at"]), files=files,
                loss=None if payload.get("loss") is None else float(payload["loss"]), reason=str(payload.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointIntegrityError(f"{source} is malformed: {type(error).__name__}: {error}") from None
        # The record decides which paths a loader opens: keep them inside the save folder.
        if not save_dir.startswith(SAVE_DIR_PREFIX) or "/" in save_dir or ".." in save_dir:
            raise CheckpointIntegrityError(f"{source} names an invalid save folder {save_dir!r}")
        for name in files:
            if name.startswith("/") or ".." in name.split("/") or not name:
                raise CheckpointIntegrityError(f"{source} lists an invalid file name {name!r}")
        if DCP_METADATA_FILE not in files or TRAIN_STATE_FILE not in files:
            raise CheckpointIntegrityError(f"{source} does not list {DCP_METADATA_FILE} and {TRAIN_STATE_FILE}")
        return record


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    checkpoint_id: str  # URI of the step-NNNNNNNNN folder
    committed: bool  # a COMMITTED record exists (its files are checked when loading or verifying)
    save_dirs: tuple[str, ...] = ()  # names of the save folders present, committed or not

    @property
    def usable(self) -> bool:
        return self.committed


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_uri(run_uri: str) -> str:
    return join(run_uri, CHECKPOINTS_DIR)


def checkpoint_uri(run_uri: str, step: int) -> str:
    return join(checkpoints_uri(run_uri), checkpoint_dir_name(step))


def run_uri_of_checkpoint(checkpoint_id: str) -> str:
    """Return the run URI of a ``<run>/checkpoints/step-N`` folder."""
    return checkpoint_id.rstrip("/").rsplit("/", 2)[0]


def parse_step(name: str) -> int | None:
    """Return the step of a ``step-NNN`` folder name, or None for any other name."""
    match = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def _base_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


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
        name = _base_name(entry["name"])
        step = parse_step(name)
        if step is None:
            continue
        # The folder's own name: parse_step also accepts unpadded names such as step-9000.
        uri = join(root, name)
        # One listing per folder, instead of one exists() call per file.
        try:
            children = fs.ls(uri, detail=True, refresh=True)
        except FileNotFoundError:  # deleted since the first listing
            continue
        names = {_base_name(child["name"]): child.get("type") for child in children}
        save_dirs = tuple(sorted(child for child, kind in names.items() if kind == "directory" and child.startswith(SAVE_DIR_PREFIX)))
        found.append(CheckpointInfo(step=step, checkpoint_id=uri, committed=names.get(COMMIT_MARKER) == "file", save_dirs=save_dirs))
    return sorted(found, key=lambda info: info.step)


def read_commit_record(fs: fsspec.AbstractFileSystem, checkpoint_id: str) -> CommitRecord:
    """Read and validate a checkpoint's commit record; raise ``CheckpointIntegrityError`` when it is missing or malformed."""
    path = join(checkpoint_id, COMMIT_MARKER)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"{path} is missing: the checkpoint was never committed or is being deleted") from None
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointIntegrityError(f"{path} is not valid JSON: {error}") from None
    record = CommitRecord.from_json(payload, path)
    folder_step = parse_step(_base_name(checkpoint_id))
    if folder_step is not None and folder_step != record.step:
        # A copied or renamed folder would otherwise rank as a newer checkpoint than it is.
        raise CheckpointIntegrityError(
            f"{path} records step {record.step}, but its folder is for step {folder_step}; the folder was copied or "
            f"renamed. Rename it back to {checkpoint_dir_name(record.step)} or delete it"
        )
    return record


def save_dir_uri(checkpoint_id: str, record: CommitRecord) -> str:
    return join(checkpoint_id, record.save_dir)


def latest_committed(fs: fsspec.AbstractFileSystem, run_uri: str) -> CheckpointInfo | None:
    """Return the committed checkpoint with the highest step; warn about newer uncommitted ones."""
    committed = committed_newest_first(fs, run_uri)
    return committed[0] if committed else None


def committed_newest_first(fs: fsspec.AbstractFileSystem, run_uri: str, before_step: int | None = None) -> list[CheckpointInfo]:
    """Return committed checkpoints, newest first, optionally only those below ``before_step``.

    Uncommitted folders newer than the newest committed checkpoint are logged as skipped.
    """
    infos = [info for info in list_checkpoints(fs, run_uri) if before_step is None or info.step < before_step]
    committed = [info for info in reversed(infos) if info.committed]
    newest_committed = committed[0].step if committed else -1
    for info in infos:
        if not info.committed and info.step > newest_committed:
            logger.warning("skipping uncommitted checkpoint %s (no commit record)", info.checkpoint_id)
    return committed


# Checksums.


def sha256_of_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """Return (size in bytes, SHA-256 hex digest) of a file, reading it in bounded chunks."""
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb", block_size=HASH_CHUNK_BYTES) as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def check_file_bytes(name: str, data: bytes | memoryview, expected: FileEntry) -> None:
    """Raise ``CheckpointIntegrityError`` when ``data`` does not have the recorded size and checksum."""
    if len(data) != expected.size_bytes:
        raise CheckpointIntegrityError(
            f"{name} is {len(data)} bytes, but the commit record lists {expected.size_bytes} (truncated or replaced)"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.sha256:
        raise CheckpointIntegrityError(f"{name} has SHA-256 {actual[:16]}..., but the commit record lists {expected.sha256[:16]}... (corrupted)")


def verify_files(fs: fsspec.AbstractFileSystem, checkpoint_id: str, record: CommitRecord, *, checksums: bool = True) -> list[str]:
    """Return the problems found in a checkpoint's files: missing, wrong size or, with ``checksums``, wrong SHA-256.

    One listing of the save folder gives the sizes; checksums read every byte.
    """
    folder = save_dir_uri(checkpoint_id, record)
    prefix = fs._strip_protocol(folder).rstrip("/") + "/"
    try:
        present = {path.removeprefix(prefix): int(info["size"]) for path, info in fs.find(folder, detail=True).items()}
    except FileNotFoundError:
        present = {}
    problems: list[str] = []
    for name, entry in sorted(record.files.items()):
        if name not in present:
            problems.append(f"{name} is missing")
        elif present[name] != entry.size_bytes:
            problems.append(f"{name} is {present[name]} bytes, but the commit record lists {entry.size_bytes} (truncated or replaced)")
        elif checksums:
            _, digest = sha256_of_file(fs, join(folder, name))
            if digest != entry.sha256:
                problems.append(f"{name} has SHA-256 {digest[:16]}..., but the commit record lists {entry.sha256[:16]}... (corrupted)")
    return problems


# Leases: a checkpoint that a process is loading is never deleted.


def leases_uri(run_uri: str) -> str:
    return join(checkpoints_uri(run_uri), LEASES_DIR)


def acquire_lease(fs: fsspec.AbstractFileSystem, run_uri: str, step: int, holder: str) -> str:
    """Write a lease on the checkpoint at ``step`` and return its path; release it with ``release_lease``."""
    path = join(leases_uri(run_uri), f"{checkpoint_dir_name(step)}.{uuid.uuid4().hex}.json")
    write_json(fs, path, {"step": step, "holder": holder, "expires_at": time.time() + LEASE_DURATION_S})
    return path


def release_lease(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
    except OSError as error:  # an expired lease is harmless, so a failed delete only delays retention
        logger.warning("could not delete lease %s: %s", path, error)


def leased_steps(fs: fsspec.AbstractFileSystem, run_uri: str, now: float | None = None) -> set[int]:
    """Return the steps with an unexpired lease."""
    now = time.time() if now is None else now
    try:
        names = [_base_name(path) for path in fs.ls(leases_uri(run_uri), detail=False, refresh=True)]
    except FileNotFoundError:
        return set()
    steps: set[int] = set()
    for name in names:
        match = _LEASE_FILE.match(name)
        if not match:
            continue
        try:
            expires_at = float(json.loads(fs.cat_file(join(leases_uri(run_uri), name)))["expires_at"])
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            continue
        if expires_at > now:
            steps.add(int(match.group(1)))
    return steps


# Retention.


@dataclass(frozen=True)
class RetentionPlan:
    keep: list[int]
    delete: list[int]
    reasons: dict[int, str]  # why each kept step is kept


def plan_retention(committed_steps: Iterable[int], keep_last: KeepLast, keep_every_steps: int | None,
                   protected: Iterable[int] = ()) -> RetentionPlan:
    """Decide which committed steps to keep: the newest ``keep_last``, milestones, protected steps, and always the newest."""
    steps = sorted(set(committed_steps))
    reasons: dict[int, str] = {}
    if steps:
        reasons[steps[-1]] = "newest"
    if keep_last in (None, KEEP_ALL):
        for step in steps:
            reasons.setdefault(step, "keep_last=all")
    else:
        for step in steps[-int(keep_last):]:
            reasons.setdefault(step, f"keep_last={keep_last}")
    if keep_every_steps is not None:
        for step in steps:
            if step % keep_every_steps == 0:
                reasons.setdefault(step, f"milestone (keep_every_steps={keep_every_steps})")
    for step in set(protected) & set(steps):
        reasons.setdefault(step, "being loaded")
    keep = [step for step in steps if step in reasons]
    return RetentionPlan(keep=keep, delete=[step for step in steps if step not in reasons], reasons=reasons)


def delete_checkpoint(fs: fsspec.AbstractFileSystem, checkpoint_id: str) -> None:
    # Remove the record first: a delete interrupted halfway leaves an uncommitted folder, which no loader reads.
    try:
        fs.rm(join(checkpoint_id, COMMIT_MARKER))
    except FileNotFoundError:
        pass
    fs.rm(checkpoint_id, recursive=True)


def remove_stale_save_dirs(fs: fsspec.AbstractFileSystem, info: CheckpointInfo, committed_save_dir: str | None) -> list[str]:
    """Delete the save folders of ``info`` other than the committed one; return their names."""
    removed: list[str] = []
    for name in info.save_dirs:
        if name == committed_save_dir:
            continue
        fs.rm(join(info.checkpoint_id, name), recursive=True)
        removed.append(name)
    return removed


def apply_retention(fs: fsspec.AbstractFileSystem, run_uri: str, keep_last: KeepLast,
                    keep_every_steps: int | None = None, *, dry_run: bool = False,
                    just_committed: int | None = None) -> list[int]:
    """Delete committed checkpoints that the policy does not keep, and leftovers of aborted saves; return the deleted steps.

    Kept: the newest ``keep_last`` committed checkpoints (``"all"`` or None keeps every one), every
    step divisible by ``keep_every_steps``, every checkpoint with an unexpired lease, and always the
    newest committed one, and ``just_committed``, the step the caller has just committed (a copied
    folder with a higher step number must not push it out). Uncommitted folders and stale save
    folders are removed only below the newest committed step, because a save in flight writes at
    or above it. Call after a commit.
    """
    infos = list_checkpoints(fs, run_uri)
    committed = [info for info in infos if info.committed]
    if not committed:
        return []
    newest = committed[-1].step
    # NOTE: a lease written after this listing is not seen, so a load that starts during retention
    # can lose its checkpoint; it then fails verification and falls back to an older one.
    protected = leased_steps(fs, run_uri) | ({just_committed} if just_committed is not None else set())
    plan = plan_retention([info.step for info in committed], keep_last, keep_every_steps, protected)
    doomed = [info for info in committed if info.step in plan.delete]
    if dry_run:
        return [info.step for info in doomed]

    deleted: list[int] = []
    for info in doomed:
        delete_checkpoint(fs, info.checkpoint_id)
        deleted.append(info.step)
    if deleted:
        logger.info("retention deleted checkpoints at steps %s (keep_last=%s, keep_every_steps=%s)", deleted, keep_last, keep_every_steps)

    for info in infos:
        if info.step >= newest or info.step in deleted:
            continue
        if not info.committed:
            logger.info("deleting uncommitted checkpoint folder %s (older than the newest committed step %d)", info.checkpoint_id, newest)
            fs.rm(info.checkpoint_id, recursive=True)
        elif len(info.save_dirs) > 1:
            try:
                record = read_commit_record(fs, info.checkpoint_id)
            except CheckpointIntegrityError as error:  # which folder is garbage is unknown: keep them all
                logger.warning("not cleaning %s: %s", info.checkpoint_id, error)
                continue
            removed = remove_stale_save_dirs(fs, info, record.save_dir)
            logger.info("deleted save folders of aborted attempts in %s: %s", info.checkpoint_id, removed)
    return deleted
