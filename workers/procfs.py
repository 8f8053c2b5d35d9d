"""Processes on this machine, read from Linux's /proc: raylets and the Ray Train workers they started.

The remove_node fault and ``stalwart stop-node`` use these to find the Ray node of
this machine without a connection to the cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Ray 2.60 sets this process title on the worker actors of Ray Train.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
# A worker started through a runtime_env wrapper (``bash -c "cd ... && python ..."``) may sit
# a few processes below its raylet.
MAX_ANCESTOR_DEPTH = 8


def command_line(pid: int) -> list[str]:
    """Return the arguments of process ``pid``, or [] when it is gone, a zombie or unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def is_running(pid: int) -> bool:
    """Return whether process ``pid`` runs; a zombie, which has an empty command line, does not."""
    return bool(command_line(pid))


def _stat_fields(pid: int) -> list[bytes] | None:
    """Return the fields of /proc/PID/stat after the command name, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces and parentheses, so split after the last ")".
    closing = stat.rfind(b")")
    return stat[closing + 2:].split() if closing >= 0 else None


def parent_pid(pid: int) -> int | None:
    """Return the parent pid of process ``pid``, or None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def start_time(pid: int) -> int | None:
    """Return when process ``pid`` started, in clock ticks since boot, or None when it is gone.

    A pid and its start time name one process: a later process that reuses the pid starts later.
    """
    fields = _stat_fields(pid)
    # Field 22 of /proc/PID/stat, the 20th after the command name.
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


@dataclass(frozen=True)
class Raylet:
    pid: int
    node_id: str
    gcs_address: str | None
    arguments: tuple[str, ...]


def _option(arguments: list[str], name: str) -> str | None:
    prefix = f"--{name}="
    return next((argument[len(prefix):] for argument in arguments if argument.startswith(prefix)), None)


def as_raylet(pid: int, arguments: list[str]) -> Raylet | None:
    """Return process ``pid`` as a raylet when its arguments are a raylet's, else None."""
    if not arguments or os.path.basename(arguments[0]) != "raylet":
        return None
    node_id = _option(arguments, "node_id")
    return Raylet(pid, node_id, _option(arguments, "gcs-address"), tuple(arguments)) if node_id else None


def local_raylets() -> list[Raylet]:
    """Return the raylets running on this machine; a test cluster runs several."""
    raylets = [as_raylet(pid, command_line(pid)) for pid in all_pids()]
    return [raylet for raylet in raylets if raylet is not None]


def descends_from(pid: int, ancestor: int) -> bool:
    """Return whether ``ancestor`` is the parent of ``pid``, or its parent's parent, up to MAX_ANCESTOR_DEPTH."""
    current: int | None = pid
    for _ in range(MAX_ANCESTOR_DEPTH):
        current = parent_pid(current)
        if current is None or current <= 1:
            return False
        if current == ancestor:
            return True
    return False


def train_worker_pids(raylet_pid: int) -> list[int]:
    """Return the pids of the Ray Train worker processes that the raylet ``raylet_pid`` started."""
    pids = []
    for pid in all_pids():
        arguments = command_line(pid)
        if arguments and arguments[0].startswith(TRAIN_WORKER_TITLE) and descends_from(pid, raylet_pid):
            pids.append(pid)
    return pids
