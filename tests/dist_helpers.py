"""Run a function on N ranks of a real gloo process group on 127.0.0.1.

Each rank is a process started with the ``spawn`` method, so the function and
its arguments must be picklable (a module-level function, plain values). The
first rank that raises stops the others, and its traceback is raised in the
caller as ``torch.multiprocessing.ProcessRaisedException``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from s3_server import free_port

# How long ranks wait in a collective for a missing peer before gloo raises.
COLLECTIVE_TIMEOUT_S = 60.0
# How long the other ranks get to exit on their own after one rank failed.
SHUTDOWN_GRACE_S = 5.0


def _run_rank(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]
) -> None:
    if sys.platform.startswith("linux"):
        # Keep gloo's own connections on loopback, whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Two cores are shared by every rank of every test: one thread each.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and wait for all of them.

    Raises the first rank's exception, or ``TimeoutError`` when the ranks are
    still running after ``timeout_s`` (they are then killed).
    """
    context = mp.start_processes(
        _run_rank,
        args=(fn, world_size, free_port(), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic()), grace_period=SHUTDOWN_GRACE_S):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{world_size} ranks running {fn.__name__} did not finish within {timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=SHUTDOWN_GRACE_S)
