"""Storage access through fsspec: one code path for local folders and ``s3://``.

Paths stay strings joined with ``/`` because ``pathlib`` collapses the ``//`` in
``s3://bucket``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that retrying cannot fix: the path or the permission is wrong, not the connection.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


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


def is_transient(error: BaseException) -> bool:
    """Return whether ``error`` is a failed connection or timeout, which a retry may fix, rather than a wrong path or permission."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, OSError):  # includes ConnectionError and TimeoutError
        return True
    try:
        import aiohttp
        import botocore.exceptions
    except ImportError:
        return False
    # s3fs passes these on without mapping them to OSError: the endpoint is down or the connection dropped.
    return isinstance(error, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, aiohttp.ClientError))


def is_storage_error(error: BaseException) -> bool:
    """Return whether ``error`` came from a storage request: fsspec's OSError, or a botocore or aiohttp error from s3fs."""
    if isinstance(error, OSError):
        return True
    try:
        import aiohttp
        import botocore.exceptions
    except ImportError:
        return False
    return isinstance(error, (botocore.exceptions.BotoCoreError, aiohttp.ClientError))


def with_retries(call: Callable[[], T], *, description: str, budget_s: float, setting: str,
                 first_backoff_s: float = 1.0, max_backoff_s: float = 30.0) -> T:
    """Run ``call``, retrying transient storage errors with doubling waits for up to ``budget_s`` seconds.

    ``description`` names the request in logs and errors, such as "reading s3://bucket/file". Once
    the budget is spent, the last error is raised inside an OSError whose message names ``setting``.
    Other errors, and every error when ``budget_s`` is 0, are raised at once.
    """
    if budget_s <= 0:
        return call()
    started = time.monotonic()
    backoff_s = first_backoff_s
    failures = 0
    while True:
        try:
            result = call()
        except Exception as error:
            if not is_transient(error):
                raise
            failures += 1
            waited_s = time.monotonic() - started
            if waited_s + backoff_s > budget_s:
                raise OSError(f"{description}: storage requests failed for {waited_s:.0f} s ({failures} tries), past "
                              f"{setting}={budget_s:g}; check that the storage is reachable, or raise {setting}. "
                              f"Last error: {type(error).__name__}: {error}") from error
            logger.warning("%s failed (%s: %s); retry %d in %.0f s", description, type(error).__name__, error, failures, backoff_s)
            time.sleep(backoff_s)
            backoff_s = min(max_backoff_s, backoff_s * 2)
        else:
            if failures:
                logger.warning("%s succeeded after %d failed tries in %.0f s", description, failures, time.monotonic() - started)
            return result
