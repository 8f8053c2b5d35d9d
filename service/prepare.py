"""Tokenize the corpus once into token shards in storage.

The dataset folder is named by a fingerprint of the input files and the
tokenizer, and ``manifest.json`` is written last, so a prepared dataset is
reused by every later run and a half-written one is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from service.config import ConfigError, DataSection
from service.storage import absolute_uri, filesystem, is_local, join, read_json, write_bytes, write_json
from workers.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SHARD_TOKENS = 16 * 1024 * 1024
TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".html", ".yaml", ".yml", ".toml"}


@dataclass(frozen=True)
class InputFile:
    uri: str
    size_bytes: int
    version: str


def stdlib_sources() -> list[str]:
    """Return the ``.py`` files of the running interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages"}
    files = [path for path in root.rglob("*.py") if not skipped.intersection(path.relative_to(root).parts)]
    return sorted(str(path) for path in files)


def resolve_inputs(data: DataSection, storage_options: dict[str, Any]) -> list[InputFile]:
    """Expand ``data.paths`` (or the default corpus) into a sorted list of files with versions."""
    patterns = data.paths if data.paths is not None else stdlib_sources()
    uris: list[str] = []
    for pattern in patterns:
        fs = filesystem(pattern, storage_options)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        if any(character in pattern for character in "*?["):
            matches = fs.glob(pattern)
        elif fs.exists(pattern):
            matches = [pattern]
        else:
            matches = []
        if not matches:
            raise ConfigError(f"data.paths entry {pattern!r} matches no file; check the path or the glob pattern")
        for match in matches:
            uri = match if match.startswith(protocol) else protocol + match
            # Local paths become absolute, so "a.txt", "./a.txt" and a glob that matches it name one file.
            uris.append(absolute_uri(uri) if is_local(uri) else uri)
    uris = sorted(set(uris))
    if data.max_files is not None:
        uris = uris[: data.max_files]
    inputs: list[InputFile] = []
    for uri in uris:
        info = filesystem(uri, storage_options).info(uri)
        if info.get("type") == "directory":
            raise ConfigError(f"data.paths entry {uri!r} is a folder; add a glob such as {uri.rstrip('/')}/**/*.txt")
        version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
        inputs.append(InputFile(uri=uri, size_bytes=int(info.get("size") or 0), version=version))
    return inputs


def dataset_fingerprint(inputs: list[InputFile], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{MANIFEST_VERSION}|{tokenizer.name}|{tokenizer.vocab_size}|{tokenizer.eos_id}\n".encode())
    for item in inputs:
        digest.update(f"{item.uri}|{item.size_bytes}|{item.version}\n".encode())
    return digest.hexdigest()[:16]


def read_documents(uri: str, text_field: str, storage_options: dict[str, Any]) -> Iterator[str]:
    """Yield the documents of one input file: the whole file, or one per JSONL line or Parquet row."""
    fs = filesystem(uri, storage_options)
    suffix = Path(uri.split("?", 1)[0]).suffix.lower()
    if suffix == ".jsonl":
        with fs.open(uri, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ConfigError(f"{uri}:{line_number} is not valid JSON ({error}); write one JSON object per line") from error
                if not isinstance(record, dict):
                    raise ConfigError(f"{uri}:{line_number} is a JSON {type(record).__name__}, not an object; write one JSON object per line")
                if text_field not in record:
                    raise ConfigError(f"{uri}:{line_number} has no {text_field!r} field; set data.text_field to the field that holds the text")
                yield str(record[text_field])
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ConfigError(f"{uri} is Parquet, which needs pyarrow; install it with `pip install 'stalwart[data]'`") from error
        with fs.open(uri, "rb") as handle:
            parquet_file = pq.ParquetFile(handle)
            columns = parquet_file.schema_arrow.names
            if text_field not in columns:
                raise ConfigError(
                    f"{uri} has no {text_field!r} column (columns: {', '.join(columns)}); "
                    "set data.text_field to the column that holds the text"
                )
            table = parquet_file.read(columns=[text_field])
        for value in table.column(text_field).to_pylist():
            if value is not None:
                yield str(value)
    else:
        yield fs.cat_file(uri).decode("utf-8", errors="replace")


def tokenize_inputs(
    inputs: list[InputFile], tokenizer: Tokenizer, text_field: str, storage_options: dict[str, Any]
) -> Iterator[np.ndarray]:
    """Yield token arrays, each document followed by the end-of-document token."""
    eos = np.asarray([tokenizer.eos_id], dtype=np.int64)
    for item in inputs:
        for document in read_documents(item.uri, text_field, storage_options):
            tokens = tokenizer.encode(document)
            if tokens.size:
                yield np.concatenate([tokens, eos])


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def prepare_dataset(data: DataSection, storage_uri: str, storage_options: dict[str, Any]) -> str:
    """Tokenize the inputs into ``<storage>/datasets/<fingerprint>/`` unless already there; return that URI."""
    tokenizer = load_tokenizer(data.tokenizer, storage_options)
    inputs = resolve_inputs(data, storage_options)
    fingerprint = dataset_fingerprint(inputs, tokenizer)
    dataset_uri = join(storage_uri, "datasets", fingerprint)
    fs = filesystem(dataset_uri, storage_options)
    manifest_uri = join(dataset_uri, MANIFEST_NAME)
    if fs.exists(manifest_uri):
        manifest = read_json(fs, manifest_uri)
        logger.info("reusing prepared dataset %s (%d tokens)", dataset_uri, manifest["num_tokens"])
        return dataset_uri

    started = time.monotonic()
    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending_tokens:
            return
        array = np.concatenate(pending).astype(dtype)
        payload = array.astype(dtype.newbyteorder("<"), copy=False).tobytes()
        name = f"shard-{len(shards):05d}.bin"
        write_bytes(fs, join(dataset_uri, name), payload)
        shards.append({"name": name, "num_tokens": int(array.size), "sha256": hashlib.sha256(payload).hexdigest()})
        pending, pending_tokens = [], 0

    for tokens in tokenize_inputs(inputs, tokenizer, data.text_field, storage_options):
        pending.append(tokens)
        pending_tokens += tokens.size
        if pending_tokens >= SHARD_TOKENS:
            flush()
    flush()
    if not shards:
        raise ConfigError("the inputs of data.paths contain no text; point data.paths at non-empty files")

    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "num_files": len(inputs),
        "num_tokens": sum(shard["num_tokens"] for shard in shards),
        "shards": shards,
    }
    # Written last: a dataset without a manifest is incomplete and gets rebuilt.
    write_json(fs, manifest_uri, manifest)
    logger.info(
        "prepared dataset %s: %d files, %d tokens in %d shards, %.1f s",
        dataset_uri, len(inputs), manifest["num_tokens"], len(shards), time.monotonic() - started,
    )
    return dataset_uri
