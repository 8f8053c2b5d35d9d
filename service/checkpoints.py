"""The ``stalwart checkpoints`` commands: list, inspect, verify, prune and export a run's checkpoints.

Every command reads storage only through the commit records and checks what
it reads; nothing is unpickled except DCP metadata, through an allowlist.
torch is imported inside the commands that need it, so building the
``stalwart`` parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from typing import Any

from service.catalog import (
    DCP_METADATA_FILE,
    TRAIN_STATE_FILE,
    CheckpointIntegrityError,
    apply_retention,
    checkpoint_uri,
    checkpoints_uri,
    leased_steps,
    list_checkpoints,
    plan_retention,
    read_commit_record,
    save_dir_uri,
    verify_files,
)
from service.storage import filesystem, is_storage_error, join, write_bytes

logger = logging.getLogger(__name__)

EXPORT_WEIGHTS_FILE = "model.safetensors"
EXPORT_CONFIG_FILE = "config.json"
EXPORT_ARCHITECTURE = "stalwart-llama"
MODEL_PREFIX = "model."
EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def _format_time(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _folder_bytes(fs: Any, uri: str) -> int:
    try:
        return sum(int(info["size"]) for info in fs.find(uri, detail=True).values())
    except FileNotFoundError:
        return 0


def list_rows(run_uri: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one row per checkpoint folder: step, committed, time, size, loss, reason, note."""
    fs = filesystem(run_uri, storage_options)
    rows: list[dict[str, Any]] = []
    for info in list_checkpoints(fs, run_uri):
        row: dict[str, Any] = {"step": info.step, "committed": info.committed, "time": None, "size_bytes": None,
                               "loss": None, "reason": "", "note": ""}
        if info.committed:
            try:
                record = read_commit_record(fs, info.checkpoint_id)
                row.update(time=record.committed_at, size_bytes=record.total_bytes, loss=record.loss, reason=record.reason)
            except CheckpointIntegrityError as error:
                row["note"] = str(error)
        else:
            row["size_bytes"] = _folder_bytes(fs, info.checkpoint_id)
            row["note"] = f"{len(info.save_dirs)} uncommitted save folder(s)"
        rows.append(row)
    return rows


def format_list(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'step':>10}  {'committed':<9}  {'time (UTC)':<19}  {'size MB':>9}  {'loss':>8}  {'reason':<10}  note"]
    for row in rows:
        size = "-" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.2f}"
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        lines.append(f"{row['step']:>10}  {'yes' if row['committed'] else 'no':<9}  {_format_time(row['time']):<19}  "
                     f"{size:>9}  {loss:>8}  {row['reason']:<10}  {row['note']}")
    return lines


def _reader(fs: Any, checkpoint_id: str, storage_options: dict[str, Any]) -> tuple[Any, Any]:
    from workers.checkpoint_io import VerifiedReader  # noqa: PLC0415

    record = read_commit_record(fs, checkpoint_id)
    return record, VerifiedReader(save_dir_uri(checkpoint_id, record), fs, storage_options, record.files)


def inspect_checkpoint(run_uri: str, step: int, storage_options: dict[str, Any]) -> list[str]:
    """Describe one checkpoint: its commit record, train state and the tensors DCP stored."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    from workers.checkpoint_io import load_dcp_metadata  # noqa: PLC0415

    fs = filesystem(run_uri, storage_options)
    checkpoint_id = checkpoint_uri(run_uri, step)
    record, reader = _reader(fs, checkpoint_id, storage_options)
    saved = json.loads(reader.fs.read_verified(TRAIN_STATE_FILE))
    metadata = load_dcp_metadata(reader.fs.read_verified(DCP_METADATA_FILE), join(save_dir_uri(checkpoint_id, record), DCP_METADATA_FILE))
    lines = [
        f"checkpoint {checkpoint_id}",
        f"  committed {_format_time(record.committed_at)} UTC, reason {record.reason or '-'}, world size {record.world_size}, "
        f"{len(record.files)} files, {record.total_bytes / 1e6:.2f} MB in {record.save_dir}",
        f"  train state: {json.dumps(saved.get('train_state', {}), sort_keys=True)}",
        f"  loss {saved.get('loss')}, attempt {saved.get('attempt')}",
        "  tensors:",
    ]
    for fqn, item in sorted(metadata.state_dict_metadata.items()):
        if isinstance(item, TensorStorageMetadata):
            dtype = str(item.properties.dtype).removeprefix("torch.")
            lines.append(f"    {fqn}  {list(item.size)}  {dtype}  {len(item.chunks)} shard(s)")
    return lines


def verify_checkpoint(fs: Any, checkpoint_id: str) -> list[str]:
    """Return every problem of one checkpoint: commit record, file sizes and checksums, metadata; [] when sound."""
    from workers.checkpoint_io import load_dcp_metadata, metadata_problems  # noqa: PLC0415

    try:
        record = read_commit_record(fs, checkpoint_id)
    except CheckpointIntegrityError as error:
        return [str(error)]
    problems = verify_files(fs, checkpoint_id, record, checksums=True)
    if any(problem.startswith(DCP_METADATA_FILE) for problem in problems):
        return problems
    try:
        data = fs.cat_file(join(save_dir_uri(checkpoint_id, record), DCP_METADATA_FILE))
        metadata = load_dcp_metadata(data, DCP_METADATA_FILE)
    except CheckpointIntegrityError as error:
        return [*problems, str(error)]
    return [*problems, *metadata_problems(metadata, {name: entry.size_bytes for name, entry in record.files.items()})]


def verify_run(run_uri: str, storage_options: dict[str, Any], step: int | None = None) -> tuple[list[str], bool]:
    """Verify the committed checkpoints of a run (or one step); return (report lines, all sound)."""
    fs = filesystem(run_uri, storage_options)
    infos = [info for info in list_checkpoints(fs, run_uri) if info.committed and (step is None or info.step == step)]
    if not infos:
        return [f"no committed checkpoint{'' if step is None else f' at step {step}'} under {run_uri}"], False
    lines: list[str] = []
    sound = True
    for info in infos:
        problems = verify_checkpoint(fs, info.checkpoint_id)
        if problems:
            sound = False
            lines.append(f"step {info.step}: CORRUPT")
            lines.extend(f"  {problem}" for problem in problems)
        else:
            lines.append(f"step {info.step}: ok")
    return lines, sound


def prune_run(run_uri: str, storage_options: dict[str, Any], keep_last: int | str, keep_every_steps: int | None,
              dry_run: bool) -> list[str]:
    """Apply retention to a run now; with ``dry_run`` only report what would be deleted."""
    fs = filesystem(run_uri, storage_options)
    committed = [info.step for info in list_checkpoints(fs, run_uri) if info.committed]
    plan = plan_retention(committed, keep_last, keep_every_steps, leased_steps(fs, run_uri))
    deleted = apply_retention(fs, run_uri, keep_last, keep_every_steps, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    lines = [f"{verb} steps: {', '.join(map(str, deleted)) or 'none'}"]
    lines += [f"kept step {step}: {plan.reasons[step]}" for step in plan.keep]
    return lines


def read_model_tensors(fs: Any, checkpoint_id: str, storage_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the full (unsharded) model weights of a checkpoint in this process; return (tensors, train_state.json)."""
    import torch  # noqa: PLC0415
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    from workers.checkpoint_io import SafeLoadPlanner  # noqa: PLC0415

    _, reader = _reader(fs, checkpoint_id, storage_options)
    saved = json.loads(reader.fs.read_verified(TRAIN_STATE_FILE))
    metadata = reader.read_metadata()
    tensors = {
        fqn.removeprefix(MODEL_PREFIX): torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for fqn, item in metadata.state_dict_metadata.items()
        if fqn.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }
    if not tensors:
        raise CheckpointIntegrityError(f"{checkpoint_id} contains no model tensors")
    state = {"model": tensors}
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return state["model"], saved


def export_checkpoint(run_uri: str, storage_options: dict[str, Any], output_uri: str, step: int | None = None,
                      dtype: str | None = None) -> str:
    """Write the consolidated model weights as safetensors plus config.json under ``output_uri``; return its URI.

    Without ``step`` the newest committed checkpoint that passes verification is used.
    """
    import safetensors.torch  # noqa: PLC0415 (only this command needs it)
    import torch  # noqa: PLC0415

    from workers.model import ModelArgs  # noqa: PLC0415

    fs = filesystem(run_uri, storage_options)
    candidates = [info for info in reversed(list_checkpoints(fs, run_uri)) if info.committed and (step is None or info.step == step)]
    if not candidates:
        raise CheckpointIntegrityError(f"no committed checkpoint{'' if step is None else f' at step {step}'} under {run_uri}")
    for info in candidates:
        try:
            tensors, saved = read_model_tensors(fs, info.checkpoint_id, storage_options)
            break
        except CheckpointIntegrityError as error:
            if step is not None:
                raise
            logger.error("checkpoint at step %d failed verification, trying an older one: %s", info.step, error)
    else:
        raise CheckpointIntegrityError(f"no committed checkpoint of {run_uri} passed verification; see the errors above")

    if dtype is not None:
        tensors = {name: tensor.to(getattr(torch, dtype)) for name, tensor in tensors.items()}
    model_config = asdict(ModelArgs(**saved["config"]["model"]))
    config = {"architecture": EXPORT_ARCHITECTURE, **model_config, "dtype": dtype or "float32",
              "step": info.step, "source": info.checkpoint_id, "weights": EXPORT_WEIGHTS_FILE}
    out_fs = filesystem(output_uri, storage_options)
    # safetensors rejects tensors that share memory; each loaded tensor has its own.
    write_bytes(out_fs, join(output_uri, EXPORT_WEIGHTS_FILE),
                safetensors.torch.save({name: tensor.contiguous() for name, tensor in tensors.items()},
                                       metadata={"format": "pt", "step": str(info.step)}))
    write_bytes(out_fs, join(output_uri, EXPORT_CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    logger.info("exported step %d of %s to %s", info.step, run_uri, output_uri)
    return output_uri


# Command line.


def _keep_last(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number of checkpoints or 'all', for example 3")
    return int(text)


def _positive_steps(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number of steps, for example 1000")
    return int(text)


def _step(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a step number, for example 1000")
    return int(text)


def _output_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder is empty: name a new folder, for example ./exported")
    return text


def add_parser(commands: Any, add_config_arguments: Any) -> None:
    """Add ``checkpoints`` and its subcommands to the ``stalwart`` parser."""
    parser = commands.add_parser("checkpoints", help="list, inspect, verify, prune or export a run's checkpoints")
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("run", help="run name (under storage.uri) or the run's full URI")
        add_config_arguments(sub)
        return sub

    action("list", help_text="one line per checkpoint: step, committed, time, size, loss")
    inspect = action("inspect", help_text="print a checkpoint's commit record, train state and tensors")
    inspect.add_argument("step", type=_step, help="step of the checkpoint")
    verify = action("verify", help_text="check every file's size and SHA-256 against the commit records")
    verify.add_argument("--step", type=_step, help="verify only this step (default: every committed checkpoint)")
    prune = action("prune", help_text="delete checkpoints by the retention policy (default: the config's checkpoint section)")
    prune.add_argument("--keep-last", type=_keep_last, help="committed checkpoints to keep, or 'all'")
    prune.add_argument("--keep-every-steps", type=_positive_steps,
                       help="also keep every checkpoint whose step is a multiple of this")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    export = action("export", help_text="write the model weights as safetensors plus config.json")
    export.add_argument("--output", "-o", required=True, type=_output_folder, help="output folder, local or s3://")
    export.add_argument("--step", type=_step, help="step to export (default: the newest committed checkpoint that verifies)")
    export.add_argument("--dtype", choices=EXPORT_DTYPES, help="cast the weights (default: as saved)")


def run_command(args: argparse.Namespace, config: Any, run_uri: str) -> int:
    """Run one ``stalwart checkpoints`` action; return the exit status."""
    options = config.storage.options
    try:
        if args.action == "list":
            rows = list_rows(run_uri, options)
            if rows:
                lines, status = format_list(rows), 0
            else:
                lines = [f"no checkpoint folders under {checkpoints_uri(run_uri)}; check the run name and storage.uri"]
                status = 1
        elif args.action == "inspect":
            lines, status = inspect_checkpoint(run_uri, args.step, options), 0
        elif args.action == "verify":
            lines, sound = verify_run(run_uri, options, args.step)
            status = 0 if sound else 1
        elif args.action == "prune":
            keep_last = args.keep_last if args.keep_last is not None else config.checkpoint.keep_last
            keep_every = args.keep_every_steps if args.keep_every_steps is not None else config.checkpoint.keep_every_steps
            lines, status = prune_run(run_uri, options, keep_last, keep_every, args.dry_run), 0
        else:
            lines, status = [f"exported to {export_checkpoint(run_uri, options, args.output, args.step, args.dtype)}"], 0
    except CheckpointIntegrityError as error:
        lines, status = [f"stalwart checkpoints {args.action}: {error}"], 1
    except Exception as error:
        if not is_storage_error(error):
            raise
        from workers.checkpoint import describe_error  # noqa: PLC0415 (imports torch, needed only here)

        lines = [f"stalwart checkpoints {args.action}: storage request failed for {run_uri}: "
                 f"{describe_error(error, options)}. Check storage.uri and storage.options, and that the storage is reachable"]
        status = 1
    for line in lines:
        print(line)
    return status
