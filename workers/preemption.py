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
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import ray

from workers.faults import command_line

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


# Ray 2.60 sets this process title on the worker actors of Ray Train.
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"


@dataclass(frozen=True)
class LocalRaylet:
    pid: int
    node_id: str
    gcs_address: str


def _option(arguments: list[str], name: str) -> str | None:
    prefix = f"--{name}="
    return next((argument[len(prefix):] for argument in arguments if argument.startswith(prefix)), None)


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name in brackets may contain spaces; the state and the parent pid follow its closing bracket.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def local_raylets() -> list[LocalRaylet]:
    """Return the raylets running on this machine, from /proc."""
    raylets = []
    for pid in _all_pids():
        arguments = command_line(pid)
        if not arguments or os.path.basename(arguments[0]) != "raylet":
            continue
        node_id, gcs_address = _option(arguments, "node_id"), _option(arguments, "gcs-address")
        if node_id and gcs_address:
            raylets.append(LocalRaylet(pid, node_id, gcs_address))
    return raylets


def train_worker_pids(raylet_pid: int) -> list[int]:
    """Return the pids of the Ray Train worker processes that the raylet ``raylet_pid`` started."""
    pids = []
    for pid in _all_pids():
        arguments = command_line(pid)
        if arguments and arguments[0].startswith(TRAIN_WORKER_TITLE) and _parent_pid(pid) == raylet_pid:
            pids.append(pid)
    return pids


def _drain_for_preemption(raylet: LocalRaylet, grace_s: float) -> None:
    """Ask the GCS to drain the node, so Ray schedules nothing new on it and Ray Train learns of the preemption."""
    from ray.core.generated import autoscaler_pb2  # noqa: PLC0415

    deadline_ms = int((time.time() + grace_s) * 1000)
    gcs = ray._raylet.GcsClient(address=raylet.gcs_address)
    accepted, message = gcs.drain_node(raylet.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                       "stalwart stop-node", deadline_ms)
    if not accepted:
        logger.warning("the GCS rejected the drain of node %s: %s. Stopping its workers anyway", raylet.node_id, message)


def stop_node(node_id: str | None = None, grace_s: float = 120.0, drain: bool = True) -> list[int]:
    """Drain this machine's Ray node, SIGTERM its Ray Train workers and wait up to ``grace_s`` for them to exit.

    A pod's preStop hook runs this before the kubelet's SIGTERM, which goes to ``ray start
    --block``: in Ray 2.60 that drains the node for 30 s and then kills the workers. Here each
    worker instead saves a checkpoint after its next step and ends its attempt (see the module
    docstring). Returns the pids still running after ``grace_s``.
    """
    raylets = local_raylets()
    if node_id is not None:
        raylets = [raylet for raylet in raylets if raylet.node_id == node_id]
    if not raylets:
        raise RuntimeError(f"no raylet{f' of node {node_id}' if node_id else ''} runs on this machine; "
                           "run this on a Ray node, or pass the node id of a raylet that runs here")
    if len(raylets) > 1:
        raise RuntimeError(f"{len(raylets)} raylets run on this machine ({', '.join(r.node_id for r in raylets)}); "
                           "pass --node-id to choose one")
    raylet = raylets[0]
    if drain:
        _drain_for_preemption(raylet, grace_s)
    pids = train_worker_pids(raylet.pid)
    logger.warning("node %s: SIGTERM to Ray Train worker processes %s (grace %.0f s)", raylet.node_id, pids, grace_s)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    # A zombie has an empty command line, so a process that exited but was not yet reaped counts as gone.
    running = [pid for pid in pids if command_line(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(WATCH_INTERVAL_S)
        running = [pid for pid in running if command_line(pid)]
    return running
