"""Run a function on N ranks of a real gloo process group on 127.0.0.1.

Ranks are started with ``torch.multiprocessing.start_processes`` and the
``forkserver`` method: the fork server imports torch and this project once
(``PRELOADED_MODULES``), and each rank forks from it, which saves several
seconds of imports per rank compared with ``spawn``. As with ``spawn``, the
function and its arguments must be picklable (a module-level function, plain
values). The first rank that raises stops the others, and its traceback is
raised in the caller as ``torch.multiprocessing.ProcessRaisedException``.
"""

from __future__ import annotations

import multiprocessing.forkserver
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
PRELOADED_MODULES = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "s3fs",
    "service.catalog",
    "service.config",
    "workers.checkpoint",
    "workers.step",
    "workers.train_loop",
]


def _run_rank(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, environment: dict[str, str], args: tuple[Any, ...]
) -> None:
    # The fork server kept the environment of the moment it started; use the caller's current one.
    os.environ.clear()
    os.environ.update(environment)
    if sys.platform.startswith("linux"):
        # Keep gloo's own connections on loopback, whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # The machine's cores are shared by every rank: one thread each.
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
    # Takes effect only before the fork server's first start in this process.
    multiprocessing.forkserver.set_forkserver_preload(PRELOADED_MODULES)
    context = mp.start_processes(
        _run_rank,
        args=(fn, world_size, free_port(), dict(os.environ), args),
        nprocs=world_size,
        join=False,
        start_method="forkserver",
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
