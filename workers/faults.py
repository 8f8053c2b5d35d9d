"""Fault injection for tests and game days: each configured fault fires once per run.

A marker in storage, written before the fault takes effect, keeps a fault from
firing again in a later attempt or after a rollback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from service.config import Config, HangFault, KillFault, SlowFault, SpikeFault
from service.storage import filesystem, join, write_json

logger = logging.getLogger(__name__)

FAULTS_DIR = "faults"


def _marker(run_uri: str, name: str) -> str:
    return join(run_uri, FAULTS_DIR, f"{name}.json")


def _due_once(config: Config, kind: type, run_uri: str, storage_options: dict[str, Any], step: int,
              world_rank: int) -> KillFault | HangFault | None:
    """Return the fault of type ``kind`` due for this rank at ``step``, after claiming its marker; None if none is due."""
    for fault in config.faults:
        if not isinstance(fault, kind) or fault.rank != world_rank or fault.step != step:
            continue
        fs = filesystem(run_uri, storage_options)
        marker = _marker(run_uri, f"{fault.kind}-rank{fault.rank}-step{fault.step}")
        if fs.exists(marker):
            continue
        write_json(fs, marker, {"kind": fault.kind, "rank": fault.rank, "step": fault.step, "fired_at": time.time()})
        return fault
    return None


def fire_kill_faults(config: Config, run_uri: str, storage_options: dict[str, Any], step: int, world_rank: int) -> None:
    """Kill this rank with SIGKILL if a kill fault is due here."""
    if _due_once(config, KillFault, run_uri, storage_options, step, world_rank) is None:
        return
    logger.warning("fault injection: killing rank %d (pid %d) with SIGKILL at step %d", world_rank, os.getpid(), step)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fire_hang_faults(config: Config, run_uri: str, storage_options: dict[str, Any], step: int, world_rank: int) -> None:
    """Block this rank for the fault's duration if a hang fault is due here."""
    fault = _due_once(config, HangFault, run_uri, storage_options, step, world_rank)
    if fault is None:
        return
    logger.warning("fault injection: rank %d hangs for up to %.0f s at step %d", world_rank, fault.seconds, step)
    deadline = time.monotonic() + fault.seconds
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def slow_fault_delay_s(config: Config, step: int, world_rank: int) -> float:
    """Return the delay a slow fault adds to this rank's step (0.0 when none applies)."""
    return sum(
        fault.seconds for fault in config.faults
        if isinstance(fault, SlowFault) and fault.rank == world_rank and step >= fault.step
    )


def spike_multiplier(config: Config, run_uri: str, storage_options: dict[str, Any], step: int, world_rank: int) -> float:
    """Return the loss multiplier of a spike fault due at ``step`` (1.0 when none fires).

    Rank 0 checks and writes the marker, then broadcasts the decision, so
    every rank scales its loss alike.
    """
    due = [fault for fault in config.faults if isinstance(fault, SpikeFault) and fault.step == step]
    if not due:
        return 1.0
    fault = due[0]
    decision = torch.zeros(1, dtype=torch.float64)
    if world_rank == 0:
        fs = filesystem(run_uri, storage_options)
        marker = _marker(run_uri, f"spike-step{fault.step}")
        if not fs.exists(marker):
            write_json(fs, marker, {"kind": "spike", "step": fault.step, "factor": fault.factor, "fired_at": time.time()})
            logger.warning("fault injection: multiplying the loss by %g at step %d", fault.factor, step)
            decision[0] = fault.factor
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(decision, src=0)
    return float(decision.item()) or 1.0
