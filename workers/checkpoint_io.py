"""Storage plumbing under torch.distributed.checkpoint: checksummed writes, verified reads, safe unpickling.

- ``ManifestWriter`` writes DCP files through streams that compute each file's
  size and SHA-256 as the bytes go by. On S3 a file larger than one part is
  uploaded as a multipart upload whose parts are sent in parallel. No rank
  creates folders or probes for old metadata: the save folder is new and rank 0
  creates it once.
- ``VerifiedReader`` reads each file whole, checks it against the commit
  record before DCP reads a byte of it, and unpickles ``.metadata`` with an allowlist
  of DCP's own classes.
- ``SafeLoadPlanner`` loads DCP's non-tensor items with ``weights_only=True``
  (torch 2.13's ``DefaultLoadPlanner`` uses ``weights_only=False``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pickle
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem, SavePlan

from service.catalog import DCP_METADATA_FILE, CheckpointIntegrityError, FileEntry, check_file_bytes

MIN_PART_BYTES = 5 * 2**20  # S3 rejects smaller parts, except the last one


# Restricted unpickling of DCP's .metadata.

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_METADATA_MODULE, name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # maps a layout name such as "torch.strided" to the layout
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only DCP's metadata classes, torch dtypes and a few plain types.

    Anything else (``os.system``, ``builtins.eval``, arbitrary classes) raises before it is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not allowed in checkpoint metadata")


def load_dcp_metadata(data: bytes, source: str) -> Metadata:
    """Unpickle DCP metadata bytes with the allowlist; raise ``CheckpointIntegrityError`` on anything else."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # any failure of untrusted bytes is an integrity problem, never a crash
        raise CheckpointIntegrityError(f"{source} was rejected: {type(error).__name__}: {error}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointIntegrityError(f"{source} contains a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that unpickles non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointIntegrityError(f"item {read_item.dest_index.fqn} was rejected: {error}") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415 (private helper)

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# Upload streams that hash what they write.


class _HashingUpload(io.RawIOBase):
    """Base of the write streams: counts bytes and computes SHA-256 as they are written."""

    def __init__(self) -> None:
        super().__init__()
        self._digest = hashlib.sha256()
        self._size = 0
        self.entry: FileEntry | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self._size += len(view)
        self._consume(view)
        return len(view)

    def close(self) -> None:
        if not self.closed:
            self._finish()
            self.entry = FileEntry(self._size, self._digest.hexdigest())
        super().close()

    def abort(self) -> None:
        """Drop a partial upload after an error; the file must not appear complete."""

    def _consume(self, view: memoryview) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError


class _LocalUpload(_HashingUpload):
    def __init__(self, path: str):
        super().__init__()
        self._path = path
        self._handle = open(path, "wb")  # noqa: SIM115 (closed in _finish or abort)

    def _consume(self, view: memoryview) -> None:
        self._handle.write(view)

    def _finish(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        self._handle.close()
        try:
            os.remove(self._path)
        except FileNotFoundError:
            pass


class _GenericUpload(_HashingUpload):
    """Any other fsspec filesystem: write through its own file object."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        super().__init__()
        self._handle = fs.open(path, "wb")

    def _consume(self, view: memoryview) -> None:
        self._handle.write(view)

    def _finish(self) -> None:
        self._handle.close()

    def abort(self) -> None:
        try:
            self._handle.close()
        except Exception:  # noqa: BLE001 (the original error is what matters)
            pass


class S3PartUpload(_HashingUpload):
    """Upload to S3 with one PUT for a small file, or a multipart upload with up to ``concurrency`` parts in flight.

    Memory stays below (concurrency + 1) x ``part_bytes``. ``max_parts_in_flight`` is the largest
    number of parts that were uploading at once.
    """

    def __init__(self, fs: Any, path: str, part_bytes: int, concurrency: int):
        super().__init__()
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes={part_bytes} is below the S3 minimum part size of {MIN_PART_BYTES} bytes")
        self._fs = fs
        self._path = path
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_bytes = part_bytes
        self._concurrency = max(1, concurrency)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._in_flight: deque[Future] = deque()
        self.max_parts_in_flight = 0

    @property
    def num_parts(self) -> int:
        return len(self._parts)

    def _consume(self, view: memoryview) -> None:
        # Fill the buffer up to one part at a time, so a write larger than a part never buffers more than a part.
        while len(view):
            room = self._part_bytes - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) == self._part_bytes:
                part = bytes(self._buffer)
                self._buffer.clear()
                self._submit(part)

    def _submit(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._fs.call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)["UploadId"]
        self._in_flight = deque(item for item in self._in_flight if not item.done())
        while len(self._in_flight) >= self._concurrency:
            self._in_flight.popleft().result()
        coroutine = self._fs._call_s3("upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                      PartNumber=len(self._parts) + 1, Body=body)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._fs.loop)
        self._parts.append(future)
        self._in_flight.append(future)
        self.max_parts_in_flight = max(self.max_parts_in_flight, len(self._in_flight))

    def _finish(self) -> None:
        if self._upload_id is None:
            self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._submit(bytes(self._buffer))
            etags = [future.result()["ETag"] for future in self._parts]
            self._fs.call_s3(
                "complete_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, 1)]},
            )
        self._buffer = bytearray()
        self._fs.invalidate_cache(self._path)

    def abort(self) -> None:
        for future in self._parts:
            future.cancel()
        if self._upload_id is not None:
            try:
                self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            except Exception:  # noqa: BLE001 (best effort: S3 lifecycle rules expire abandoned uploads)
                pass


def open_upload(fs: fsspec.AbstractFileSystem, path: str, *, part_bytes: int, concurrency: int) -> _HashingUpload:
    """Open a hashing write stream for ``path`` suited to ``fs``."""
    if isinstance(fs, LocalFileSystem):
        return _LocalUpload(fs._strip_protocol(path))
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover (s3fs is a dependency)
        S3FileSystem = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(fs, S3FileSystem):
        return S3PartUpload(fs, path, part_bytes, concurrency)
    return _GenericUpload(fs, path)


# The DCP FileSystem, StorageWriter and StorageReader.


class _ManifestFileSystem(FsspecFileSystem):
    """DCP's fsspec adapter with hashing writes and whole-file verified reads.

    ``written`` maps each written file (relative to ``root``) to its size and checksum.
    ``expected`` lists the files a reader may open, from the commit record.
    """

    def __init__(self, root: str, fs: fsspec.AbstractFileSystem, *, part_bytes: int, concurrency: int,
                 expected: dict[str, FileEntry] | None = None):
        super().__init__()
        self.fs = fs
        self.root = root.rstrip("/")
        self.part_bytes = part_bytes
        self.concurrency = concurrency
        self.expected = expected or {}
        self.written: dict[str, FileEntry] = {}
        # Reasons of every integrity check that failed here, kept because DCP rewraps some of them.
        self.integrity_errors: list[str] = []

    def relative(self, path: str | os.PathLike) -> str:
        return os.fspath(path).removeprefix(self.root + "/")

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if mode == "rb":
            yield io.BytesIO(self.read_verified(self.relative(path)))
            return
        if mode != "wb":
            raise ValueError(f"unsupported mode {mode!r} for checkpoint files")
        stream = open_upload(self.fs, path, part_bytes=self.part_bytes, concurrency=self.concurrency)
        try:
            yield stream
            stream.close()
        except BaseException:
            stream.abort()
            raise
        assert stream.entry is not None
        self.written[self.relative(path)] = stream.entry

    def read_verified(self, name: str) -> bytes:
        """Read the file ``name`` whole and check it against the commit record."""
        try:
            return self._read_verified(name)
        except CheckpointIntegrityError as error:
            self.integrity_errors.append(str(error))
            raise

    def _read_verified(self, name: str) -> bytes:
        expected = self.expected.get(name)
        if expected is None:
            raise CheckpointIntegrityError(f"{name} is not listed in the commit record")
        path = f"{self.root}/{name}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CheckpointIntegrityError(f"{name} is missing from {self.root}") from None
        check_file_bytes(name, data, expected)
        return data

    def mkdir(self, path: str | os.PathLike) -> None:
        # Rank 0 creates the save folder once before any rank writes.
        pass


class ManifestWriter(FsspecWriter):
    """DCP writer for a new, empty save folder that records every file's size and SHA-256 in ``written``."""

    def __init__(self, path: str, fs: fsspec.AbstractFileSystem, storage_options: dict[str, Any], *,
                 part_bytes: int, concurrency: int):
        # sync_files=False: each stream makes its own bytes durable on close (fsync locally, a completed PUT on S3).
        super().__init__(path, single_file_per_rank=True, sync_files=False, **storage_options)
        self.fs = _ManifestFileSystem(path, fs, part_bytes=part_bytes, concurrency=concurrency)
        self.path = path

    @property
    def written(self) -> dict[str, FileEntry]:
        return self.fs.written

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # The base class creates the folder and looks for an old .metadata on every rank;
        # the save folder is unique to this attempt, so neither is needed.
        return plan

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {result.index: result.storage_data for rank_results in results for result in rank_results}
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(f"{self.path}/{DCP_METADATA_FILE}", "wb") as stream:
            pickle.dump(metadata, stream)


class VerifiedReader(FsspecReader):
    """DCP reader that checks every file against the commit record and never unpickles unknown classes."""

    def __init__(self, path: str, fs: fsspec.AbstractFileSystem, storage_options: dict[str, Any],
                 expected: dict[str, FileEntry]):
        super().__init__(path, **storage_options)
        self.fs = _ManifestFileSystem(path, fs, part_bytes=MIN_PART_BYTES, concurrency=1, expected=expected)
        self.path = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointIntegrityError("rank-local DCP metadata is not used by Stalwart checkpoints")
        try:
            metadata = load_dcp_metadata(self.fs.read_verified(DCP_METADATA_FILE), f"{self.path}/{DCP_METADATA_FILE}")
        except CheckpointIntegrityError as error:
            if str(error) not in self.fs.integrity_errors:
                self.fs.integrity_errors.append(str(error))
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def metadata_problems(metadata: Metadata, sizes: dict[str, int]) -> list[str]:
    """Return items of ``metadata`` that point outside the files listed in ``sizes`` (name -> bytes)."""
    problems: list[str] = []
    for index, info in (metadata.storage_data or {}).items():
        size = sizes.get(info.relative_path)
        if size is None:
            problems.append(f"{index.fqn} is stored in {info.relative_path}, which the commit record does not list")
        elif info.offset < 0 or info.length < 0 or info.offset + info.length > size:
            problems.append(f"{index.fqn}: bytes {info.offset}..{info.offset + info.length} exceed {info.relative_path} ({size} bytes)")
    return problems

