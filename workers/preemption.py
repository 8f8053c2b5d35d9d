"""SIGTERM sent straight to a training worker process, as Kubernetes and spot reclaim send it.

Ray Train 2.60 runs the train function in a thread of the worker actor, where
``signal.signal`` raises ``ValueError``. Ray's worker main loop
(``ray._private.worker.Worker.main_loop``) installs its own SIGTERM handler,
which ends the process at once, and it does so after a runtime_env
``worker_process_setup_hook`` has run, so a handler installed by such a hook is
replaced. The handler here is therefore installed by an actor task: Ray runs
the tasks of the synchronous Ray Train worker actor on the process's main
thread, and the core worker runs Python signal handlers there while it waits
for tasks.

The handler only records the time of the first SIGTERM in a module variable.
The training loop sends that flag in the all-reduce of the step's loss sum, so
every rank stops after the same step. A watcher thread logs the signal and ends
the process if it still runs ``fault_tolerance.stop_grace_s`` after the signal.

``stop_node`` sends that SIGTERM from outside: ``stalwart stop-node``, a Kubernetes
preStop hook, runs it on a node about to go away.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import ray

from workers.procfs import Raylet, is_running, local_raylets, start_time, train_worker_pids

logger = logging.getLogger(__name__)

# Exit status of a worker ended by the grace timeout (128 + SIGTERM, the shell convention).
EXIT_PREEMPTED = 143
INSTALL_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5

# time.monotonic() of the first SIGTERM this process received; None until then.
# Only the signal handler writes it, with one assignment, so readers need no lock.
_sigterm_received_at: float | None = None


class WorkerPreempted(RuntimeError):
    """Raised on every rank once the checkpoint of a worker preemption has committed.

    Ray Train counts the attempt as failed, shuts down the worker group (which ends
    the preempted process) and starts a new attempt that resumes from that checkpoint.
    """


def _record_sigterm(signum: int, frame: FrameType | None) -> None:
    # Runs on the main thread between two bytecodes, so it does no I/O and takes no lock.
    global _sigterm_received_at
    if _sigterm_received_at is None:
        _sigterm_received_at = time.monotonic()


def sigterm_received() -> bool:
    """Return whether this process has received SIGTERM since the handler was installed."""
    return _sigterm_received_at is not None


def install_sigterm_handler() -> None:
    """Replace the SIGTERM handler of this process with one that only sets the flag (main thread only)."""
    signal.signal(signal.SIGTERM, _record_sigterm)


def install_in_worker_process(timeout_s: float = INSTALL_TIMEOUT_S) -> bool:
    """Install the SIGTERM handler on the main thread of this Ray Train worker and return whether that worked.

    Called from the training thread. It submits ``install_sigterm_handler`` to this
    worker's own actor through ``RayTrainWorker.execute``, the method Ray Train 2.60
    uses to run setup functions on its workers, and waits for it. Without the handler,
    SIGTERM keeps Ray's behaviour: the process exits and the attempt restarts from
    the newest committed checkpoint.
    """
    if threading.current_thread() is threading.main_thread():
        install_sigterm_handler()
        return True
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(install_sigterm_handler), timeout=timeout_s)
    except (RuntimeError, AttributeError, ray.exceptions.RayError) as error:
        # NOTE: RayTrainWorker.execute is internal to Ray Train, so a Ray upgrade may rename it.
        logger.warning("failed to install the SIGTERM handler in worker pid %d: %r. SIGTERM to this "
                       "worker ends it without a checkpoint", os.getpid(), error)
        return False
    return True


def _exit_after_grace(description: str, grace_s: float) -> None:
    logger.error("%s: the rank did not stop within fault_tolerance.stop_grace_s=%.0f s after SIGTERM, so pid %d "
                 "exits with status %d", description, grace_s, os.getpid(), EXIT_PREEMPTED)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED)


class SigtermWatcher:
    """Daemon thread that logs the first SIGTERM and calls ``on_expired`` ``grace_s`` seconds after it.

    ``description`` names the run, attempt and rank in the log lines. The default
    ``on_expired`` ends the process: a rank that has not stopped by then cannot
    save any more, and the sender (for example the kubelet) kills it soon anyway.
    """

    def __init__(self, description: str, grace_s: float,
                 on_expired: Callable[[str, float], None] = _exit_after_grace):
        self.description = description
        self.grace_s = grace_s
        self._on_expired = on_expired
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalwart-sigterm-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread without calling ``on_expired`` (the attempt finished)."""
        self._stop.set()
        self._thread.join(timeout=5 * WATCH_INTERVAL_S)

    def _run(self) -> None:
        while _sigterm_received_at is None:
            if self._stop.wait(WATCH_INTERVAL_S):
                return
        logger.warning("%s: pid %d received SIGTERM, so every rank saves a checkpoint after its next step and the "
                       "attempt ends (fault_tolerance.stop_grace_s=%.0f s)", self.description, os.getpid(), self.grace_s)
        remaining_s = _sigterm_received_at + self.grace_s - time.monotonic()
        if self._stop.wait(max(0.0, remaining_s)):
            return
        self._on_expired(self.description, self.grace_s)


# Maximum seconds of stop_node's grace period that the drain request may take. A GCS that is
# gone (the head pod deleted first) must not keep the workers from their SIGTERM.
DRAIN_TIMEOUT_S = 10.0


def request_drain(node_id: str, gcs_address: str, deadline_s: float, message: str = "stalwart stop-node") -> None:
    """Ask the GCS to drain a node for preemption, as the autoscaler and ``ray drain-node`` do.

    Ray then schedules nothing new on the node, and Ray Train informs its workers. ``deadline_s``
    is a wall-clock time. Raises ``RuntimeError`` when the GCS rejects the drain.
    """
    from ray.core.generated import autoscaler_pb2  # noqa: PLC0415

    gcs = ray._raylet.GcsClient(address=gcs_address)
    accepted, rejection = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                         message, int(deadline_s * 1000), timeout=DRAIN_TIMEOUT_S)
    if not accepted:
        raise RuntimeError(f"the GCS rejected the drain of node {node_id}: {rejection}")
    logger.warning("node %s: the GCS accepted the drain (reason preemption, deadline in %.0f s)",
                   node_id, deadline_s - time.time())


def _drain_best_effort(raylet: Raylet, grace_s: float) -> None:
    """Request the drain on a daemon thread, wait for it for a limited time, and log a failure.

    The wait is at most DRAIN_TIMEOUT_S or half of ``grace_s``, whichever is shorter, so the
    workers keep at least half the grace to save and exit when the GCS does not respond.
    """
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            request_drain(raylet.node_id, raylet.gcs_address, time.time() + grace_s)
        except Exception as error:  # noqa: BLE001 (logged below; the workers get their SIGTERM regardless)
            errors.append(error)

    thread = threading.Thread(target=drain, name="stalwart-drain", daemon=True)
    thread.start()
    wait_s = min(DRAIN_TIMEOUT_S, grace_s / 2)
    thread.join(timeout=wait_s)
    if thread.is_alive():
        logger.warning("node %s: the GCS at %s did not respond to the drain request within %.1f s, so the workers are "
                       "stopped without the drain", raylet.node_id, raylet.gcs_address, wait_s)
    elif errors:
        logger.warning("node %s: the drain request to the GCS at %s failed, so the workers are stopped without the "
                       "drain: %s", raylet.node_id, raylet.gcs_address, errors[0])


def stop_node(node_id: str | None = None, grace_s: float = 130.0, drain: bool = True) -> list[int]:
    """Drain this machine's Ray node, SIGTERM its Ray Train workers and wait up to ``grace_s`` for them to exit.

    A pod's preStop hook runs this before the kubelet's SIGTERM. That SIGTERM goes to the
    container's main process: ``ray start --block`` drains the node for 30 s and then kills the
    workers (Ray 2.60), and a shell there ignores it. Here each worker instead saves a
    checkpoint after its next step and ends its attempt (see the module docstring). The drain's
    deadline, which Ray Train enforces, is ``grace_s`` from now, and the drain request itself
    takes at most DRAIN_TIMEOUT_S or half of it. Returns the pids still running after ``grace_s``.
    Raises ``ValueError`` for a ``grace_s`` that is not a positive number, and ``RuntimeError``
    when no raylet (or several, without ``node_id``) runs on this machine.
    """
    if not (math.isfinite(grace_s) and grace_s > 0):
        raise ValueError(f"grace_s={grace_s} must be a positive number of seconds")
    deadline = time.monotonic() + grace_s
    running_here = local_raylets()
    raylets = [raylet for raylet in running_here if node_id is None or raylet.node_id == node_id]
    if not raylets:
        found = ", ".join(raylet.node_id for raylet in running_here) or "none"
        raise RuntimeError(f"no raylet{f' of node {node_id}' if node_id is not None else ''} runs on this machine "
                           f"(raylets here: {found}). Run this on a Ray node, or pass the node id of a raylet that runs here")
    if len(raylets) > 1:
        raise RuntimeError(f"{len(raylets)} raylets run on this machine ({', '.join(r.node_id for r in raylets)}). "
                           "Pass --node-id to choose one")
    raylet = raylets[0]
    if drain:
        if raylet.gcs_address is None:
            logger.warning("node %s: the raylet's arguments name no GCS address, so the node is not drained", raylet.node_id)
        else:
            _drain_best_effort(raylet, grace_s)

    # A pid with its start time names one process, so a pid reused by a new process counts as exited.
    signalled: dict[int, int | None] = {}
    for pid in train_worker_pids(raylet.pid):
        started = start_time(pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError as error:
            logger.error("node %s: SIGTERM to Ray Train worker pid %d failed: %s", raylet.node_id, pid, error)
        signalled[pid] = started
    if not signalled:
        logger.warning("node %s: no Ray Train worker process runs below its raylet (pid %d)", raylet.node_id, raylet.pid)
        return []
    logger.warning("node %s: sent SIGTERM to Ray Train worker processes %s, and waits up to %.0f s for them to exit",
                   raylet.node_id, sorted(signalled), deadline - time.monotonic())

    def running() -> list[int]:
        return [pid for pid, started in signalled.items() if is_running(pid) and start_time(pid) == started]

    still_running = running()
    while still_running and time.monotonic() < deadline:
        time.sleep(WATCH_INTERVAL_S)
        still_running = running()
    if not still_running:
        logger.warning("node %s: every Ray Train worker exited", raylet.node_id)
    return still_running
