"""Storage access through fsspec: one code path for local folders and ``s3://``.

Paths stay strings joined with ``/`` because ``pathlib`` collapses the ``//`` in
``s3://bucket``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def join(base: str, *parts: str) -> str:
    """Join URI parts with single slashes, keeping the scheme's ``//``."""
    path = base.rstrip("/")
    for part in parts:
        path = f"{path}/{part.strip('/')}"
    return path


def absolute_uri(uri: str) -> str:
    """Return ``uri`` with a local path made absolute (other schemes unchanged)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://")).rstrip("/") or "/"


def filesystem(uri: str, options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """Return the fsspec filesystem that serves ``uri`` with the given storage options."""
    fs, _ = url_to_fs(uri, **(options or {}))
    return fs


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def write_json(fs: fsspec.AbstractFileSystem, path: str, payload: Any) -> None:
    """Write ``payload`` as JSON in one put, so readers never see half a file on object stores."""
    write_bytes(fs, path, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole file or none of it.

    An object-store PUT is atomic already. On a local disk the bytes go to a
    temporary file that is renamed into place.
    """
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path).decode("utf-8"))
