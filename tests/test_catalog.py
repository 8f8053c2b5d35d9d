"""Checkpoint catalog on a local folder: step parsing, latest committed checkpoint, retention."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec
import pytest

from service.catalog import (
    COMMIT_MARKER,
    DCP_METADATA_FILE,
    apply_retention,
    checkpoint_dir_name,
    checkpoints_uri,
    latest_committed,
    list_checkpoints,
    parse_step,
)
from service.storage import filesystem

LOGGER_NAME = "service.catalog"


@pytest.fixture
def fs() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


@pytest.fixture
def run_uri(tmp_path: Path) -> str:
    return str(tmp_path / "run")


def make_checkpoint(run_uri: str, name: str, *, committed: bool = True, metadata: bool = True) -> Path:
    """Create a checkpoint folder named ``name`` with a shard file and the requested markers."""
    folder = Path(checkpoints_uri(run_uri)) / name
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shard")
    if metadata:
        (folder / DCP_METADATA_FILE).write_bytes(b"metadata")
    if committed:
        (folder / COMMIT_MARKER).write_text("", encoding="utf-8")
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
    assert "no commit marker" in warnings[0]


def test_committed_without_metadata_skipped(fs, run_uri, caplog):
    make_checkpoint(run_uri, "step-000000100")
    make_checkpoint(run_uri, "step-000000200", metadata=False)

    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        latest = latest_committed(fs, run_uri)

    assert latest is not None
    assert latest.step == 100
    assert any(f"no {DCP_METADATA_FILE}" in record.getMessage() for record in caplog.records)


def test_only_incomplete_checkpoints(fs, run_uri):
    make_checkpoint(run_uri, "step-000000100", committed=False)
    make_checkpoint(run_uri, "step-000000200", metadata=False)

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


def test_retention_spares_incomplete_folders(fs, run_uri):
    make_checkpoint(run_uri, "step-000000100", committed=False)
    make_checkpoint(run_uri, "step-000000200", metadata=False)
    for step in (300, 400, 500):
        make_checkpoint(run_uri, checkpoint_dir_name(step))
    make_checkpoint(run_uri, "step-000000600", committed=False)

    deleted = apply_retention(fs, run_uri, keep_last=1)

    assert deleted == [300, 400]
    assert remaining_names(run_uri) == ["step-000000100", "step-000000200", "step-000000500", "step-000000600"]


def test_retention_with_few_checkpoints_deletes_nothing(fs, run_uri):
    for step in (100, 200):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    assert apply_retention(fs, run_uri, keep_last=2) == []
    assert remaining_names(run_uri) == ["step-000000100", "step-000000200"]


def test_retention_keep_all(fs, run_uri):
    for step in (100, 200, 300):
        make_checkpoint(run_uri, checkpoint_dir_name(step))

    assert apply_retention(fs, run_uri, keep_last=None) == []
    assert remaining_names(run_uri) == ["step-000000100", "step-000000200", "step-000000300"]


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
        writer.pipe_file(f"{folder}/{DCP_METADATA_FILE}", b"metadata")
        writer.pipe_file(f"{folder}/{COMMIT_MARKER}", b"")

    commit(100)
    first = latest_committed(reader, run_uri)
    commit(200)
    second = latest_committed(reader, run_uri)

    assert first is not None
    assert first.step == 100
    assert second is not None
    assert second.step == 200
    assert second.checkpoint_id == f"{checkpoints_uri(run_uri)}/step-000000200"
