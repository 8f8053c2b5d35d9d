"""Sharded checkpoint save and load with torch.distributed.checkpoint over fsspec.

A save has two halves. ``stage_state`` copies model and optimizer shards to new
CPU tensors on the training thread. ``write_and_commit`` then writes them from
any thread, as a collective over a process group of its own:

1. rank 0 picks a new save folder ``step-N/save-<id>/`` and broadcasts it to the others;
2. every rank writes its RNG file and its DCP shard, hashing the bytes;
3. the ranks gather their file lists on rank 0;
4. rank 0 writes ``train_state.json`` and then the commit record ``COMMITTED``,
   which lists every file with its size and SHA-256, and applies retention;
5. rank 0 broadcasts the outcome, so every rank agrees whether it committed.

An error on any rank makes every rank skip the commit; no rank stops early,
because that would leave the others waiting in a collective. ``load_checkpoint``
reads only the files the commit record names, checks each one, and raises
``CheckpointIntegrityError`` on every rank when any rank finds a problem.
``s3://`` works exactly like a local path.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from service.catalog import (
    COMMIT_MARKER,
    SAVE_DIR_PREFIX,
    TRAIN_STATE_FILE,
    CheckpointInfo,
    CheckpointIntegrityError,
    CommitRecord,
    FileEntry,
    KeepLast,
    acquire_lease,
    apply_retention,
    list_checkpoints,
    read_commit_record,
    release_lease,
    remove_stale_save_dirs,
    run_uri_of_checkpoint,
    save_dir_uri,
    verify_files,
)
from service.config import SECRET_KEY_PATTERN, redact_url_credentials
from service.storage import filesystem, join, write_bytes
from workers.checkpoint_io import ManifestWriter, SafeLoadPlanner, VerifiedReader, open_upload
from workers.collectives import all_gather_json, broadcast_json

logger = logging.getLogger(__name__)

DEFAULT_PART_BYTES = 64 * 2**20
DEFAULT_UPLOAD_CONCURRENCY = 8
MAX_ERROR_CHARS = 2000
# Environment variables whose values must never reach a log line or an error message.
SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

T = TypeVar("T")


class CheckpointSaveError(RuntimeError):
    """A save did not commit, and no commit record was written; the message gives the reason."""


@dataclass
class TrainState:
    """Training progress that a resume needs besides model and optimizer, saved as JSON by rank 0."""

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


@dataclass(frozen=True)
class SaveSettings:
    """Settings for writing checkpoint files and for retention."""

    storage_options: dict[str, Any]
    keep_last: KeepLast = "all"
    keep_every_steps: int | None = None
    part_bytes: int = DEFAULT_PART_BYTES
    upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY


@dataclass
class SaveRequest:
    """A staged checkpoint, ready to be written by ``write_and_commit``; its tensors are private CPU copies."""

    step: int
    checkpoint_id: str
    run_uri: str
    state: dict[str, Any]
    rng: dict[str, str]
    train_state: dict[str, Any]
    config: dict[str, Any]
    world_rank: int
    world_size: int
    reason: str = "interval"
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveOutcome:
    """The result of one ``write_and_commit``, identical on every rank."""

    step: int
    checkpoint_id: str
    committed: bool
    error: str | None
    duration_s: float  # rank 0's wall time from the start of the write to the commit
    total_bytes: int
    save_dir: str | None
    deleted_steps: list[int]
    # Rank 0's time.monotonic() when the write started and ended, the same value on every rank,
    # so that time-based decisions (retry backoff, outage budget) agree across ranks.
    started_clock: float = 0.0
    finished_clock: float = 0.0
    loss: float | None = None
    tokens_seen: int = 0


def rank_rng_file(world_rank: int) -> str:
    return f"rng-{world_rank:05d}.json"


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


def scrub_secrets(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """Replace credential values from the AWS environment and from ``storage_options`` in ``text``."""
    secrets = [os.environ.get(name, "") for name in SECRET_ENVIRONMENT]

    def collect(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for child_key, child in value.items():
                collect(child, str(child_key))
        elif isinstance(value, str) and SECRET_KEY_PATTERN.search(key):
            secrets.append(value)

    collect(storage_options or {})
    for secret in sorted({item for item in secrets if len(item) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return redact_url_credentials(text)[:MAX_ERROR_CHARS]


def describe_error(error: BaseException, storage_options: dict[str, Any] | None = None) -> str:
    """Return a one-paragraph, credential-free description of ``error``; DCP errors name the failing ranks."""
    if isinstance(error, CheckpointException):
        parts = [f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(error.failures.items())]
        text = "; ".join(parts) or str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return scrub_secrets(" ".join(text.split()), storage_options)


# Saving.


def stage_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copy this rank's model and optimizer shards into new CPU tensors that training never touches.

    Containers are rebuilt too, so a later in-place change (an LR written into a param group) does
    not reach the copy.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return BlockingAsyncStager(cache_staged_state_dict=False).stage({"model": model_state, "optimizer": optimizer_state})


class Stager:
    """Stages like ``stage_state`` into CPU buffers that are allocated once and reused by later saves.

    Reuse is safe only while no earlier staged copy is still being written, which is true because at
    most one save is in flight and a new one is staged only after the previous one ended. Pinned
    memory is used when CUDA is available, which speeds up the copy from the GPU.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Any] | None = None

    def stage(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # NOTE: torch 2.13 has no public API for copying into existing buffers; BlockingAsyncStager
        # uses these two private helpers itself, but pins memory even where no GPU exists.
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict  # noqa: PLC0415

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if self._buffers is not None:
            try:
                return _copy_state_dict(state, self._buffers)
            except (KeyError, ValueError, RuntimeError, AssertionError):
                self._buffers = None  # the structure changed, for example new optimizer state: allocate again
        self._buffers = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state, self._buffers)


def _new_save_dir_name() -> str:
    return f"{SAVE_DIR_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _write_file(fs: Any, path: str, data: bytes, settings: SaveSettings) -> FileEntry:
    stream = open_upload(fs, path, part_bytes=settings.part_bytes, concurrency=settings.upload_concurrency)
    try:
        stream.write(data)
        stream.close()
    except BaseException:
        stream.abort()
        raise
    assert stream.entry is not None
    return stream.entry


def write_and_commit(request: SaveRequest, settings: SaveSettings, group: dist.ProcessGroup | None = None) -> SaveOutcome:
    """Write a staged checkpoint and commit it; a collective over ``group`` that every rank must enter.

    Returns the same outcome on every rank. Raises only when a collective itself fails (a peer died).
    """
    started = time.monotonic()
    fs = filesystem(request.checkpoint_id, settings.storage_options)
    errors: list[str] = []

    # 1. One save folder per attempt, created once (object stores need no folders).
    announcement: dict[str, Any] = {}
    if request.world_rank == 0:
        name = _new_save_dir_name()
        announcement = {"save_dir": name, "clock": time.monotonic()}
        try:
            if isinstance(fs, LocalFileSystem):
                fs.makedirs(join(request.checkpoint_id, name), exist_ok=True)
        except OSError as error:
            announcement["error"] = f"rank 0: creating the save folder failed: {describe_error(error, settings.storage_options)}"
    announcement = broadcast_json(announcement, group)
    if "error" in announcement:
        return SaveOutcome(step=request.step, checkpoint_id=request.checkpoint_id, committed=False, error=announcement["error"],
                           duration_s=time.monotonic() - started, total_bytes=0, save_dir=None, deleted_steps=[],
                           started_clock=announcement["clock"], finished_clock=announcement["clock"])
    save_dir = join(request.checkpoint_id, announcement["save_dir"])

    # 2. RNG file and DCP shard of this rank.
    files: dict[str, FileEntry] = {}
    rng_name = rank_rng_file(request.world_rank)
    try:
        files[rng_name] = _write_file(fs, join(save_dir, rng_name), json.dumps(request.rng).encode("utf-8"), settings)
    except Exception as error:  # noqa: BLE001 (reported to rank 0, which then does not commit)
        errors.append(f"rank {request.world_rank}: writing {rng_name} failed: {describe_error(error, settings.storage_options)}")
    writer = ManifestWriter(save_dir, fs, settings.storage_options, part_bytes=settings.part_bytes,
                            concurrency=settings.upload_concurrency)
    try:
        dcp.save(request.state, storage_writer=writer, process_group=group)
    except (Exception, CheckpointException) as error:  # DCP raises the same CheckpointException on every rank
        errors.append(f"writing the DCP shards failed: {describe_error(error, settings.storage_options)}")
    files.update(writer.written)

    # 3. Every rank's files and errors, on every rank.
    reports = all_gather_json({"files": {name: [entry.size_bytes, entry.sha256] for name, entry in files.items()},
                               "errors": errors}, group)

    # 4. Rank 0 commits when no rank failed.
    outcome: dict[str, Any] = {}
    if request.world_rank == 0:
        outcome = _commit(request, settings, fs, announcement["save_dir"], reports, started)
        outcome["clock"] = time.monotonic()
    # 5. The same outcome everywhere.
    outcome = broadcast_json(outcome, group)
    return SaveOutcome(step=request.step, checkpoint_id=request.checkpoint_id, committed=outcome["committed"],
                       error=outcome.get("error"), duration_s=outcome["duration_s"], total_bytes=outcome.get("total_bytes", 0),
                       save_dir=announcement["save_dir"], deleted_steps=outcome.get("deleted_steps", []),
                       started_clock=announcement["clock"], finished_clock=outcome["clock"],
                       loss=request.loss, tokens_seen=int(request.train_state.get("tokens_seen", 0)))


def _commit(request: SaveRequest, settings: SaveSettings, fs: Any, save_dir_name: str,
            reports: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Rank 0: write train_state.json and the commit record, then apply retention; return the outcome."""
    errors = [error for report in reports for error in report["errors"]]
    if errors:
        return {"committed": False, "error": "; ".join(dict.fromkeys(errors)), "duration_s": time.monotonic() - started}
    files = {name: FileEntry(size, digest) for report in reports for name, (size, digest) in report["files"].items()}
    save_dir = join(request.checkpoint_id, save_dir_name)
    committed_at = time.time()
    try:
        train_state = {"train_state": request.train_state, "world_size": request.world_size, "config": request.config,
                       "saved_at": committed_at, "loss": request.loss, **request.extra}
        files[TRAIN_STATE_FILE] = _write_file(fs, join(save_dir, TRAIN_STATE_FILE),
                                              json.dumps(train_state, indent=2, sort_keys=True).encode("utf-8"), settings)
        record = CommitRecord(step=request.step, save_dir=save_dir_name, world_size=request.world_size,
                              committed_at=committed_at, files=files, loss=request.loss, reason=request.reason)
        # The record goes last, in one atomic write: a checkpoint without it is never loaded.
        write_bytes(fs, join(request.checkpoint_id, COMMIT_MARKER), json.dumps(record.to_json(), indent=2).encode("utf-8"))
    except Exception as error:  # noqa: BLE001 (the outcome carries it to every rank)
        return {"committed": False, "error": f"rank 0: committing failed: {describe_error(error, settings.storage_options)}",
                "duration_s": time.monotonic() - started}
    duration_s = time.monotonic() - started

    deleted: list[int] = []
    try:
        # Save folders of earlier failed attempts at this step are garbage now.
        for info in list_checkpoints(fs, request.run_uri):
            if info.step == request.step:
                remove_stale_save_dirs(fs, info, save_dir_name)
        deleted = apply_retention(fs, request.run_uri, settings.keep_last, settings.keep_every_steps,
                                  just_committed=request.step)
    except Exception as error:  # noqa: BLE001 (the checkpoint is committed; a failed cleanup is retried after the next save)
        logger.warning("step=%d retention after the commit failed: %s", request.step, describe_error(error, settings.storage_options))
    return {"committed": True, "duration_s": duration_s, "total_bytes": record.total_bytes, "deleted_steps": deleted}


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
    keep_last: KeepLast,
    extra: dict[str, Any] | None = None,
    keep_every_steps: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Save and commit a checkpoint synchronously from every rank; return the seconds it took.

    Raises ``CheckpointSaveError`` on every rank when the save did not commit.
    """
    started = time.monotonic()
    extra = dict(extra or {})
    request = SaveRequest(step=train_state.step, checkpoint_id=checkpoint_id, run_uri=run_uri,
                          state=stage_state(model, optimizer), rng=rng_state_payload(), train_state=train_state.to_dict(),
                          config=config, world_rank=world_rank, world_size=world_size,
                          reason=extra.pop("reason", "interval"), loss=extra.pop("loss", None), extra=extra)
    settings = SaveSettings(storage_options=storage_options, keep_last=keep_last, keep_every_steps=keep_every_steps)
    outcome = write_and_commit(request, settings, group)
    if not outcome.committed:
        raise CheckpointSaveError(f"checkpoint {checkpoint_id} was not committed: {outcome.error}")
    return time.monotonic() - started


# Loading.


class CheckpointLoadError(RuntimeError):
    """Loading failed for a reason other than the checkpoint's content, such as storage that does not respond."""


def _classify(error: BaseException, reader: VerifiedReader | None, storage_options: dict[str, Any]) -> tuple[str, str]:
    """Return ("integrity" or "storage", description) for an error raised while loading."""
    integrity = _is_integrity_failure(error) or (reader is not None and bool(reader.fs.integrity_errors))
    if reader is not None and reader.fs.integrity_errors and not isinstance(error, CheckpointIntegrityError):
        # DCP wraps a failed read_metadata in an AssertionError; the recorded reason is clearer.
        return "integrity", reader.fs.integrity_errors[0]
    return ("integrity" if integrity else "storage"), describe_error(error, storage_options)


def _is_integrity_failure(error: BaseException) -> bool:
    # Content that parses badly after passing its checksum (a record written by hand) is an integrity problem too.
    if isinstance(error, (CheckpointIntegrityError, FileNotFoundError, ValueError, KeyError)):
        return True
    if isinstance(error, CheckpointException):
        return bool(error.failures) and all(_is_integrity_failure(exc) for exc, _ in error.failures.values())
    return False


def _agree(local: tuple[str, str] | None, group: dist.ProcessGroup | None, checkpoint_id: str) -> None:
    """Gather every rank's (kind, message) and raise the same error on every rank when any rank failed.

    A storage error wins over an integrity error: the checkpoint may be fine once storage responds.
    """
    reports = all_gather_json(local, group)
    by_message: dict[tuple[str, str], list[int]] = {}
    for rank, report in enumerate(reports):
        if report:
            by_message.setdefault((report[0], report[1]), []).append(rank)
    if not by_message:
        return
    lines = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"
             for (_, message), ranks in by_message.items()]
    text = f"{checkpoint_id}: " + "; ".join(lines)
    if any(kind == "storage" for kind, _ in by_message):
        raise CheckpointLoadError(text)
    raise CheckpointIntegrityError(text)


# Param-group keys that choose the optimizer's kernels: a setting of this run, not of the checkpoint.
OPTIMIZER_KERNEL_KEYS = ("foreach", "fused")


def keep_optimizer_kernels(optimizer: torch.optim.Optimizer, kernels: list[dict[str, Any]]) -> None:
    """Restore this run's kernel choice after a load copied the saved param groups over it.

    The fused kernels want each parameter's step count on the parameter's device,
    where a checkpoint saved with foreach kernels keeps it on the CPU.
    """
    for group, chosen in zip(optimizer.param_groups, kernels, strict=True):
        group.update(chosen)
        if not chosen.get("fused"):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def load_checkpoint(
    checkpoint_id: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world_rank: int,
    world_size: int,
    seed: int,
    storage_options: dict[str, Any],
    group: dist.ProcessGroup | None = None,
) -> TrainState:
    """Load model, optimizer and train state at the current world size (DCP reshards as needed); a collective.

    Every file is checked against the commit record before it is used. When any rank finds a
    missing, short or corrupted file, every rank raises ``CheckpointIntegrityError`` with the
    reasons; the model may then hold a mix of states, so load another checkpoint before training.
    Any other failure (storage that does not respond) raises ``CheckpointLoadError`` on every rank.

    RNG: a rank at the saved world size gets its own saved stream back; at a
    new world size every rank gets a distinct stream derived from the seed.
    """
    fs = filesystem(checkpoint_id, storage_options)
    lease: str | None = None
    local: tuple[str, str] | None = None
    record: CommitRecord | None = None
    reader: VerifiedReader | None = None
    saved: dict[str, Any] = {}
    try:
        try:
            if world_rank == 0:
                step = int(checkpoint_id.rstrip("/").rsplit("-", 1)[-1])
                lease = acquire_lease(fs, run_uri_of_checkpoint(checkpoint_id), step, f"pid {os.getpid()}")
            record = read_commit_record(fs, checkpoint_id)
            if world_rank == 0:
                # One listing finds missing and short files before any rank reads a shard.
                problems = verify_files(fs, checkpoint_id, record, checksums=False)
                if problems:
                    raise CheckpointIntegrityError("; ".join(problems))
            reader = VerifiedReader(save_dir_uri(checkpoint_id, record), fs, storage_options, record.files)
            saved = json.loads(reader.fs.read_verified(TRAIN_STATE_FILE))
        except Exception as error:  # noqa: BLE001 (classified and agreed on below)
            local = _classify(error, reader, storage_options)
        _agree(local, group, checkpoint_id)
        assert record is not None and reader is not None

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=group)
            kernels = [{key: group.get(key) for key in OPTIMIZER_KERNEL_KEYS} for group in optimizer.param_groups]
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
            keep_optimizer_kernels(optimizer, kernels)
            if saved.get("world_size") == world_size and rank_rng_file(world_rank) in record.files:
                restore_rng_state(json.loads(reader.fs.read_verified(rank_rng_file(world_rank))))
            else:
                seed_rank_rng(seed, int(saved["train_state"]["step"]), world_rank, world_size)
        except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
            local = _classify(error, reader, storage_options)
        _agree(local, group, checkpoint_id)
        return TrainState.from_dict(saved["train_state"])
    finally:
        if lease is not None:
            release_lease(fs, lease)


def load_saved_train_state(checkpoint_id: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Return the verified ``train_state.json`` payload of a committed checkpoint (step, loss, config)."""
    fs = filesystem(checkpoint_id, storage_options)
    record = read_commit_record(fs, checkpoint_id)
    reader = VerifiedReader(save_dir_uri(checkpoint_id, record), fs, storage_options, record.files)
    return json.loads(reader.fs.read_verified(TRAIN_STATE_FILE))


def load_newest_valid(candidates: list[CheckpointInfo], load: Callable[[str], T], *, world_rank: int,
                      log_prefix: str = "") -> tuple[CheckpointInfo, T] | None:
    """Call ``load`` on each checkpoint, newest first, until one passes verification; a collective.

    A checkpoint that fails verification is logged with the reason and skipped. Returns None when
    there are no candidates; raises ``CheckpointIntegrityError`` when every candidate failed, since
    starting over silently would discard the run.
    """
    failures: list[str] = []
    for info in candidates:
        try:
            return info, load(info.checkpoint_id)
        except CheckpointIntegrityError as error:
            if world_rank == 0:
                logger.error("%scheckpoint at step %d failed verification, falling back to an older one: %s",
                             log_prefix, info.step, error)
            failures.append(f"step {info.step}: {error}")
    if failures:
        # The fix comes first: error texts are cut at MAX_ERROR_CHARS on their way to the driver.
        raise CheckpointIntegrityError(
            f"none of the {len(failures)} committed checkpoints passed verification. Run `stalwart checkpoints verify` "
            f"on the run, and delete the damaged checkpoints to start over. Reasons: {'; '.join(failures)}"
        )
    return None
