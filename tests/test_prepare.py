"""Dataset preparation: input formats, idempotent reuse, clear errors, the default corpus."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.config import ConfigError, DataSection
from service.prepare import MANIFEST_NAME, prepare_dataset, resolve_inputs
from workers.tokenizer import BYTE_EOS_ID


def byte_tokens(*documents: str) -> list[int]:
    """Byte-level tokens of ``documents``, each followed by end-of-document."""
    tokens: list[int] = []
    for document in documents:
        tokens.extend(document.encode("utf-8"))
        tokens.append(BYTE_EOS_ID)
    return tokens


def prepare(tmp_path: Path, paths: list[str], **data_fields) -> str:
    return prepare_dataset(DataSection(paths=paths, **data_fields), str(tmp_path / "storage"), {})


def read_tokens(dataset_uri: str) -> list[int]:
    manifest = json.loads((Path(dataset_uri) / MANIFEST_NAME).read_text(encoding="utf-8"))
    arrays = [np.fromfile(Path(dataset_uri) / shard["name"], dtype=np.dtype(manifest["dtype"]).newbyteorder("<")) for shard in manifest["shards"]]
    return np.concatenate(arrays).astype(np.int64).tolist()


def shard_mtimes(dataset_uri: str) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in Path(dataset_uri).iterdir()}


def test_text_files_tokenized_in_path_order(tmp_path: Path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")

    dataset_uri = prepare(tmp_path, [str(tmp_path / "*.txt")])

    assert read_tokens(dataset_uri) == byte_tokens("first", "second")


def test_manifest_describes_shards(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")

    dataset_uri = prepare(tmp_path, [str(tmp_path / "a.txt")])

    manifest = json.loads((Path(dataset_uri) / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["fingerprint"] == Path(dataset_uri).name
    assert manifest["tokenizer"] == "byte"
    assert manifest["dtype"] == "uint16"
    assert manifest["num_files"] == 1
    assert manifest["num_tokens"] == 6
    assert [shard["num_tokens"] for shard in manifest["shards"]] == [6]


def test_second_prepare_reuses_dataset(tmp_path: Path):
    (tmp_path / "a.txt").write_text("some text to tokenize", encoding="utf-8")
    first_uri = prepare(tmp_path, [str(tmp_path / "a.txt")])
    mtimes = shard_mtimes(first_uri)
    # Coarse filesystem clocks would hide a rewrite that follows at once.
    time.sleep(0.05)

    second_uri = prepare(tmp_path, [str(tmp_path / "a.txt")])

    assert second_uri == first_uri
    assert shard_mtimes(second_uri) == mtimes


def test_changed_input_gives_new_dataset(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("version one", encoding="utf-8")
    first_uri = prepare(tmp_path, [str(path)])

    path.write_text("version two, longer", encoding="utf-8")
    second_uri = prepare(tmp_path, [str(path)])

    assert second_uri != first_uri
    assert read_tokens(second_uri) == byte_tokens("version two, longer")


def test_dataset_without_manifest_rebuilt(tmp_path: Path):
    (tmp_path / "a.txt").write_text("interrupted", encoding="utf-8")
    dataset_uri = prepare(tmp_path, [str(tmp_path / "a.txt")])
    (Path(dataset_uri) / MANIFEST_NAME).unlink()

    assert prepare(tmp_path, [str(tmp_path / "a.txt")]) == dataset_uri
    assert (Path(dataset_uri) / MANIFEST_NAME).exists()


def test_jsonl_text_field(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "alpha", "id": 1}, {"text": "beta\u00e9", "id": 2}]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n", encoding="utf-8")

    dataset_uri = prepare(tmp_path, [str(path)])

    assert read_tokens(dataset_uri) == byte_tokens("alpha", "beta\u00e9")


def test_jsonl_custom_text_field(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "custom"}) + "\n", encoding="utf-8")

    dataset_uri = prepare(tmp_path, [str(path)], text_field="body")

    assert read_tokens(dataset_uri) == byte_tokens("custom")


def test_jsonl_missing_field_rejected(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, [str(path)])

    message = str(caught.value)
    assert f"{path}:2" in message
    assert "'text'" in message
    assert "data.text_field" in message


def test_jsonl_invalid_line_rejected(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, [str(path)])

    message = str(caught.value)
    assert f"{path}:2" in message
    assert "JSON" in message


def test_jsonl_non_object_line_rejected(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps("a bare string with text in it") + "\n", encoding="utf-8")

    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, [str(path)])

    assert f"{path}:1" in str(caught.value)


def test_parquet_text_column(tmp_path: Path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["row one", None, "row three"], "score": [1, 2, 3]}), path)

    dataset_uri = prepare(tmp_path, [str(path)])

    assert read_tokens(dataset_uri) == byte_tokens("row one", "row three")


def test_parquet_missing_column_rejected(tmp_path: Path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["row one"]}), path)

    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, [str(path)])

    message = str(caught.value)
    assert str(path) in message
    assert "'text'" in message
    assert "data.text_field" in message


def test_glob_without_match_rejected(tmp_path: Path):
    pattern = str(tmp_path / "missing" / "*.txt")

    with pytest.raises(ConfigError) as caught:
        resolve_inputs(DataSection(paths=[pattern]), {})

    message = str(caught.value)
    assert repr(pattern) in message
    assert "matches no file" in message


def test_missing_file_rejected(tmp_path: Path):
    path = str(tmp_path / "absent.txt")

    with pytest.raises(ConfigError, match="matches no file"):
        resolve_inputs(DataSection(paths=[path]), {})


def test_folder_input_rejected(tmp_path: Path):
    folder = tmp_path / "corpus"
    folder.mkdir()

    with pytest.raises(ConfigError) as caught:
        resolve_inputs(DataSection(paths=[str(folder)]), {})

    assert "is a folder" in str(caught.value)
    assert "**/*.txt" in str(caught.value)


def test_empty_inputs_rejected(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")

    with pytest.raises(ConfigError, match="contain no text"):
        prepare(tmp_path, [str(tmp_path / "empty.txt")])


def test_overlapping_patterns_deduplicated(tmp_path: Path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name, encoding="utf-8")

    inputs = resolve_inputs(DataSection(paths=[str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "*")]), {})

    assert [Path(item.uri).name for item in inputs] == ["a.txt", "b.txt", "c.md"]
    assert [item.size_bytes for item in inputs] == [5, 5, 4]


def test_relative_and_absolute_paths_deduplicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("once", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    spellings = ["corpus/a.txt", "./corpus/a.txt", "corpus/*.txt", str(tmp_path / "corpus" / "a.txt"), f"file://{tmp_path}/corpus/a.txt"]

    inputs = resolve_inputs(DataSection(paths=spellings), {})

    assert [item.uri for item in inputs] == [str(tmp_path / "corpus" / "a.txt")]


def test_max_files_keeps_first_paths(tmp_path: Path):
    for name in ("c.txt", "a.txt", "b.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")

    inputs = resolve_inputs(DataSection(paths=[str(tmp_path / "*.txt")], max_files=2), {})

    assert [Path(item.uri).name for item in inputs] == ["a.txt", "b.txt"]


def test_default_corpus_is_stdlib():
    inputs = resolve_inputs(DataSection(paths=None), {})

    uris = [item.uri for item in inputs]
    assert len(uris) > 1000
    assert uris == sorted(uris)
    assert all(uri.endswith(".py") for uri in uris)
    assert any(uri.endswith("/os.py") for uri in uris)
    assert any(uri.endswith("/json/__init__.py") for uri in uris)
    assert not any("site-packages" in uri for uri in uris)
