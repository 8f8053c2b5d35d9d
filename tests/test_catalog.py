"""Checkpoint catalog on a local folder: step parsing, commit records, latest committed checkpoint, retention, leases."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import fsspec
import pytest

from s3_server import free_port
from service.catalog import (
    COMMIT_MARKER,
    DCP_METADATA_FILE,
    LEASES_DIR,
    TRAIN_STATE_FILE,
    CheckpointIntegrityError,
    CommitRecord,
    FileEntry,
    acquire_lease,
    apply_retention,
    checkpoint_dir_name,
    checkpoints_uri,
    latest_committed,
    list_checkpoints,
    parse_step,
    plan_retention,
    read_commit_record,
    release_lease,
    verify_files,
)
from service.storage import filesystem

LOGGER_NAME = "service.catalog"


@pytest.fixture
def fs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


@pytest.fixture
def run_uri(tmp_path: Path) -> str:
    return str(tmp_path / "run")


SAVE_DIR = "save-20260101T000000Z-0123abcd"
FILES = {"__0_0.distcp": b"shard", DCP_METADATA_FILE: b"metadata", TRAIN_STATE_FILE: b"{}"}


def make_checkpoint(run_uri: str, name: str, *, committed: bool = True, save_dir: str = SAVE_DIR) -> Path:
    """Create a checkpoint folder named ``name`` with one save folder and, if ``committed``, a commit record for it."""
    folder = Path(checkpoints_uri(run_uri)) / name
    (folder / save_dir).mkdir(parents=True)
    for file_name, data in FILES.items():
        (folder / save_dir / file_name).write_bytes(data)
    if committed:
        record = CommitRecord(
            step=parse_step(name) or 0, save_dir=save_dir, world_size=1, committed_at=1.0,
            files={file_name: FileEntry(len(data), hashlib.sha256(data).hexdigest()) for file_name, data in FILES.items()},
        )
        (folder / COMMIT_MARKER).write_text(json.dumps(record.to_json()), encoding="utf-8")
    return folder


def remaining_names(run_uri: str) -> list[str]:
    return sorted(path.name for path in Path(checkpoints_uri(run_uri)).iterdir())


def test_dir_name_is_zero_padded():
    assert checkpoint_dir_name(1200) == "step-000001200"


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-000010000", 10000),
        ("step-9000", 9000),
        ("step-10000", 10000),
        ("step-0", 0),
        ("/runs/demo/checkpoints/step-000000100", 100),
        ("s3://bucket/runs/demo/checkpoints/step-000000100/", 100),
    ],
)
def test_parse_step_accepts(name: str, step: int):
    assert parse_step(name) == step


@pytest.mark.parametrize("name", ["step-", "step-abc", "step-12.tmp", "step-12-old", "ckpt-12", "Step-12", "train_state.json"])
def test_parse_step_rejects(name: str):
    assert parse_step(name) is None


def test_no_checkpoints_folder(fs, run_uri):
    assert list_checkpoints(fs, run_uri) == []
    assert latest_committed(fs, run_uri) is None


def test_latest_is_highest_padded_step(fs, run_uri):
    make_checkpoint(run_uri, "step-000009000")
    make_checkpoint(run_uri, "step-000010000")

    latest = latest_committed(fs, run_uri)

    assert latest is not None
    assert latest.step == 10000
    assert latest.checkpoint_id.endswith("/checkpoints/step-000010000")


def test_latest_by_number_not_text(fs, run_uri):
    # As text "step-9000" sorts after "step-10000".
    make_checkpoint(run_uri, "step-9000")
    make_checkpoint(run_uri, "step-10000")

    latest = latest_committed(fs, run_uri)

    assert [info.step for info in list_checkpoints(fs, run_uri)] == [9000, 10000]
    assert latest is not None
    assert latest.step == 10000


def test_checkpoint_id_is_existing_folder(fs, run_uri):
    folder = make_checkpoint(run_uri, "step-9000")

    (info,) = list_checkpoints(fs, run_uri)

    assert Path(info.checkpoint_id) == folder


def test_files_and_other_folders_ignored(fs, run_uri):
    make_checkpoint(run_uri, "step-000000100")
    root = Path(checkpoints_uri(run_uri))
    (root / "step-000000200").write_text("a file, not a folder", encoding="utf-8")
    (root / "tmp-upload").mkdir()

    assert [info.step for info in list_checkpoints(fs, run_uri)] == [100]


def test_uncommitted_newer_checkpoint_skipped(fs, run_uri, caplog):
    make_checkpoint(run_uri, "step-000000100")
    incomplete = make_checkpoint(run_uri, "step-000000200", committed=False)

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        latest = latest_committed(fs, run_uri)

    assert latest is not None
    assert latest.step == 100
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(incomplete) in warnings[0]
    assert "no commit record" in warnings[0]


def test_commit_record_round_trip(fs, run_uri):
    folder = make_checkpoint(run_uri, "step-000000100")

    record = read_commit_record(fs, str(folder))

    assert record.step == 100
    assert record.save_dir == SAVE_DIR
    assert record.files[DCP_METADATA_FILE] == FileEntry(len(b"metadata"), hashlib.sha256(b"metadata").hexdigest())
    assert record.total_bytes == sum(len(data) for data in FILES.values())
    assert verify_files(fs, str(folder), record) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda payload: payload.pop("format"), "not a Stalwart commit record"),
        (lambda payload: payload["files"].pop(DCP_METADATA_FILE), "does not list .metadata"),
        (lambda payload: payload.update(save_dir="../elsewhere"), "invalid save folder"),
        (lambda payload: payload["files"].update({"../escape": {"size_bytes": 1, "sha256": "0"}}), "invalid file name"),
        (lambda payload: payload.pop("step"), "malformed"),
        (lambda payload: payload.update(step=90), "records step 90, but its folder is for step 100; .* Rename it back"),
    ],
)
def test_commit_record_rejects(fs, run_uri, mutate, message):
    folder = make_checkpoint(run_uri, "step-000000100")
    payload = json.loads((folder / COMMIT_MARKER).read_text())
    mutate(payload)
    (folder / COMMIT_MARKER).write_text(json.dumps(payload))

    with pytest.raises(CheckpointIntegrityError, match=message):
        read_commit_record(fs, str(folder))


def test_commit_record_not_json(fs, run_uri):
    folder = make_checkpoint(run_uri, "step-000000100")
    (folder / COMMIT_MARKER).write_text("{", encoding="utf-8")

    with pytest.raises(CheckpointIntegrityError, match="not valid JSON"):
        read_commit_record(fs, str(folder))


def test_verify_files_finds_missing_short_and_changed(fs, run_uri):
    folder = make_checkpoint(run_uri, "step-000000100")
    record = read_commit_record(fs, str(folder))
    (folder / SAVE_DIR / DCP_METADATA_FILE).unlink()
    (folder / SAVE_DIR / "__0_0.distcp").write_bytes(b"shar")
    (folder / SAVE_DIR / TRAIN_STATE_FILE).write_bytes(b"[]")

    problems = verify_files(fs, str(folder), record)

    assert problems == [
        ".metadata is missing",
        "__0_0.distcp is 4 bytes, but the commit record lists 5 (truncated or replaced)",
        f"{TRAIN_STATE_FILE} has SHA-256 {hashlib.sha256(b'[]').hexdigest()[:16]}..., but the commit record lists "
        f"{hashlib.sha256(b'{}').hexdigest()[:16]}... (corrupted)",
    ]
    assert verify_files(fs, str(folder), record, checksums=False) == problems[:2]


def test_only_incomplete_checkpoints(fs, run_uri):
    make_checkpoint(run_uri, "step-000000100", committed=False)
    make_checkpoint(run_uri, "step-000000200", committed=False)

    assert latest_committed(fs, run_uri) is None


def test_older_incomplete_checkpoint_not_warned(fs, run_uri, caplog):
    make_checkpoint(run_uri, "step-000000100", committed=False)
    make_checkpoint(run_uri, "step-000000200")

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        latest = latest_committed(fs, run_uri)

    assert latest is not None
    assert latest.step == 200
    assert caplog.records == []


def test_retention_keeps_newest_by_number(fs, run_uri):
    for step in (800, 900, 1000, 1100):
        make_checkpoint(run_uri, f"step-{step}")

    deleted = apply_retention(fs, run_uri, keep_last=2)

    assert deleted == [800, 900]
    assert remaining_names(run_uri) == ["step-1000", "step-1100"]


def test_retention_removes_only_old_incomplete_folders(fs, run_uri):
    make_checkpoint(run_uri, "step-000000100", committed=False)
    for step in (300, 400, 500):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
    # A save in flight writes above the newest committed step: its folder stays.
    make_checkpoint(run_uri, "step-000000600", committed=False)

    deleted = apply_retention(fs, run_uri, keep_last=1)

    assert deleted == [300, 400]
    assert remaining_names(run_uri) == ["step-000000500", "step-000000600"]


def test_retention_removes_stale_save_folders(fs, run_uri):
    folder = make_checkpoint(run_uri, "step-000000100")
    (folder / "save-20250101T000000Z-deadbeef").mkdir()
    make_checkpoint(run_uri, "step-000000200")

    apply_retention(fs, run_uri, keep_last=2)

    assert sorted(path.name for path in folder.iterdir()) == [COMMIT_MARKER, SAVE_DIR]


def test_retention_with_few_checkpoints_deletes_nothing(fs, run_uri):
    for step in (100, 200):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    assert apply_retention(fs, run_uri, keep_last=2) == []
    assert remaining_names(run_uri) == ["step-000000100", "step-000000200"]


@pytest.mark.parametrize("keep_last", ["all", None])
def test_retention_keep_all(fs, run_uri, keep_last):
    for step in (100, 200, 300):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    assert apply_retention(fs, run_uri, keep_last=keep_last) == []
    assert remaining_names(run_uri) == ["step-000000100", "step-000000200", "step-000000300"]


def test_retention_milestones_across_many_saves(fs, run_uri):
    # Retention runs after every commit, as the saver does.
    for step in range(1, 31):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
        apply_retention(fs, run_uri, keep_last=3, keep_every_steps=10)

    assert [info.step for info in list_checkpoints(fs, run_uri)] == [10, 20, 28, 29, 30]


def test_retention_keep_all_with_milestones_deletes_nothing(fs, run_uri):
    for step in range(1, 13):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
        apply_retention(fs, run_uri, keep_last="all", keep_every_steps=5)

    assert [info.step for info in list_checkpoints(fs, run_uri)] == list(range(1, 13))


def test_retention_spares_leased_checkpoint(fs, run_uri):
    for step in (100, 200, 300):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
    lease = acquire_lease(fs, run_uri, 100, "test")

    assert apply_retention(fs, run_uri, keep_last=1) == [200]
    release_lease(fs, lease)
    assert apply_retention(fs, run_uri, keep_last=1) == [100]
    assert remaining_names(run_uri) == [LEASES_DIR, "step-000000300"]


def test_plan_retention_reasons():
    plan = plan_retention([5, 10, 15, 20, 25], keep_last=1, keep_every_steps=10, protected=[5])

    assert plan.keep == [5, 10, 20, 25]
    assert plan.delete == [15]
    assert plan.reasons == {25: "newest", 10: "milestone (keep_every_steps=10)", 20: "milestone (keep_every_steps=10)",
                            5: "being loaded"}


def test_retention_logs_deleted_steps(fs, run_uri, caplog):
    for step in (100, 200):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        apply_retention(fs, run_uri, keep_last=1)

    assert any("[100]" in record.getMessage() and "keep_last=1" in record.getMessage() for record in caplog.records)


@pytest.mark.s3
def test_s3_listing_sees_later_commit(s3_server, s3_bucket):
    # The writer is a separate instance, as in another process, so its writes do not invalidate the reader's cache.
    run_uri = f"s3://{s3_bucket}/run"
    writer = s3_server.filesystem()
    reader = filesystem(run_uri, s3_server.storage_options())

    def commit(step: int) -> None:
        folder = f"{checkpoints_uri(run_uri)}/{checkpoint_dir_name(step)}"
        writer.pipe_file(f"{folder}/{SAVE_DIR}/{DCP_METADATA_FILE}", b"metadata")
        writer.pipe_file(f"{folder}/{COMMIT_MARKER}", b"{}")

    commit(100)
    first = latest_committed(reader, run_uri)
    commit(200)
    second = latest_committed(reader, run_uri)

    assert first is not None
    assert first.step == 100
    assert second is not None
    assert second.step == 200
    assert second.checkpoint_id == f"{checkpoints_uri(run_uri)}/step-000000200"


def test_prune_command_applies_policy(run_uri, capsys):
    from service.cli import main

    for step in range(1, 9):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    assert main(["checkpoints", "prune", run_uri, "--keep-last", "2", "--keep-every-steps", "3", "--dry-run"]) == 0
    assert "would delete steps: 1, 2, 4, 5" in capsys.readouterr().out
    assert len(remaining_names(run_uri)) == 8

    assert main(["checkpoints", "prune", run_uri, "--keep-last", "2", "--keep-every-steps", "3"]) == 0
    output = capsys.readouterr().out
    assert "deleted steps: 1, 2, 4, 5" in output
    assert "kept step 6: milestone (keep_every_steps=3)" in output
    assert remaining_names(run_uri) == [checkpoint_dir_name(step) for step in (3, 6, 7, 8)]


def test_retention_keeps_just_committed(fs, run_uri):
    # A copy of step 10 renamed to step-9000 lists as the newest checkpoint.
    for step in (10, 20):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
    copied = make_checkpoint(run_uri, "step-9000")
    (copied / COMMIT_MARKER).write_text((Path(checkpoints_uri(run_uri)) / checkpoint_dir_name(10) / COMMIT_MARKER).read_text())
    make_checkpoint(run_uri, checkpoint_dir_name(25))

    deleted = apply_retention(fs, run_uri, keep_last=1, just_committed=25)

    assert deleted == [10, 20]
    assert remaining_names(run_uri) == [checkpoint_dir_name(25), "step-9000"]
    with pytest.raises(CheckpointIntegrityError, match="records step 10, but its folder is for step 9000"):
        read_commit_record(fs, str(copied))


@pytest.mark.parametrize(("arguments", "message"), [
    (["prune", "--keep-last", "0"], "argument --keep-last: invalid value '0': expected a positive number of checkpoints or 'all'"),
    (["prune", "--keep-last", "-1"], "argument --keep-last: invalid value '-1'"),
    (["prune", "--keep-last", "1.5"], "argument --keep-last: invalid value '1.5'"),
    (["prune", "--keep-every-steps", "0"], "argument --keep-every-steps: invalid value '0': expected a positive number of steps"),
    (["export", "-o", ""], "the output folder is empty"),
    (["inspect", "-5"], "argument step: invalid value '-5': expected a step number"),
])
def test_checkpoints_bad_arguments_rejected(run_uri, capsys, arguments, message):
    from service.cli import main

    make_checkpoint(run_uri, checkpoint_dir_name(10))
    action, *rest = arguments
    with pytest.raises(SystemExit):
        main(["checkpoints", action, run_uri, *rest])
    assert message in capsys.readouterr().err
    assert remaining_names(run_uri) == [checkpoint_dir_name(10)]


def test_checkpoints_unreachable_storage_reported(aws_test_environment, capsys):
    from service.cli import main

    port = free_port()  # nothing listens there
    options = f"storage.options={{endpoint_url: 'http://127.0.0.1:{port}', config_kwargs: {{connect_timeout: 1, retries: {{max_attempts: 1}}}}}}"

    assert main(["checkpoints", "list", "s3://bucket/run", "--set", options]) == 1
    output = capsys.readouterr().out
    assert "stalwart checkpoints list: storage request failed for s3://bucket/run" in output
    assert "Check storage.uri and storage.options" in output


def test_list_missing_run(run_uri, capsys):
    from service.cli import main

    assert main(["checkpoints", "list", run_uri]) == 1
    assert f"no checkpoint folders under {checkpoints_uri(run_uri)}" in capsys.readouterr().out


@pytest.mark.parametrize("run", ["../other", "", "a b"])
def test_checkpoints_bad_run_name_rejected(capsys, run):
    from service.cli import main

    assert main(["checkpoints", "list", run]) == 2
    assert f"RUN={run!r} is not a run name" in capsys.readouterr().err
