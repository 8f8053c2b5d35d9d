"""Recovery benchmark: kill a worker repeatedly and measure what each failure costs.

Runs `stalwart train` once with a SIGKILL of rank 1 every ``--kill-every`` steps and reads
the step history afterwards. Prints, per failure: recovery seconds (last step of the
failed attempt to the first step of the next), steps lost (recomputed), and for the run:
goodput and its parts.

    python bench/recovery.py --steps 600 --kill-every 60 --checkpoint-every 20

With ``--wall-s`` the failures follow the clock instead: the benchmark itself sends
SIGKILL to rank 1 of the running attempt every ``--kill-interval-s`` seconds (its pid
comes from the run's ``ranks/`` files), sends SIGTERM to the driver after ``--wall-s``
seconds, and counts goodput over that wall time:

    python bench/recovery.py --wall-s 600 --kill-interval-s 60 --checkpoint-every 20

On 2 CPU cores a tiny model makes ~4 steps/s, so 600 steps are a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.goodput import GoodputTracker  # noqa: E402
from workers.procfs import is_running  # noqa: E402
from workers.reporting import read_history  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--kill-every", type=int, default=60, help="steps between injected SIGKILLs of rank 1")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--storage", default=None, help="storage root (default: a temporary folder)")
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("--wall-s", type=float, default=None,
                        help="run for this many seconds with clock-driven failures, then stop the run with SIGTERM")
    parser.add_argument("--log-every", type=int, default=1,
                        help="train.log_every (default 1: every step is in the history, at a cost per step; goodput "
                        "stays right with more, but the unflushed steps of a killed attempt count as recovery)")
    parser.add_argument("--kill-interval-s", type=float, default=60.0,
                        help="with --wall-s: seconds between SIGKILLs of rank 1 (default 60)")
    return parser.parse_args()


STOP_GRACE_S = 180.0  # how long the driver may take to save and exit after SIGTERM
POLL_S = 0.5


def rank_pid(run_uri: str, rank: int) -> int | None:
    """Return the pid of ``rank`` in the newest attempt that has written its ranks/ file, or None."""
    files = sorted(Path(run_uri, "ranks").glob(f"attempt-*-rank-{rank:05d}.json"))
    if not files:
        return None
    return int(json.loads(files[-1].read_text())["pid"])


def drive_by_clock(process: subprocess.Popen, run_uri: str, wall_s: float, interval_s: float) -> int:
    """Send SIGKILL to rank 1 every ``interval_s`` seconds until ``wall_s``, then SIGTERM to the driver; return the kill count."""
    started = time.monotonic()
    next_kill = started + interval_s
    killed: set[int] = set()
    while time.monotonic() - started < wall_s and process.poll() is None:
        time.sleep(POLL_S)
        if time.monotonic() < next_kill:
            continue
        pid = rank_pid(run_uri, 1)
        # A pid already killed means the next attempt has not started yet: try again shortly.
        if pid is None or pid in killed or not is_running(pid):
            continue
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        next_kill = time.monotonic() + interval_s
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    return len(killed)


def main() -> int:
    args = parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="stalwart-recovery-")
    run_name = f"recovery-{int(time.time())}"
    by_clock = args.wall_s is not None
    kills = [] if by_clock else [
        {"kind": "kill", "rank": 1, "step": step} for step in range(args.kill_every, args.steps, args.kill_every)
    ]
    # Clock-driven runs stop by SIGTERM long before this many steps.
    steps = 10**7 if by_clock else args.steps
    overrides = [
        f"run.name={run_name}", f"storage.uri={storage}", "run.max_failures=100",
        "model.n_layers=2", "model.dim=64", "model.seq_len=64", "data.max_files=40",
        # With log_every=1 the history is flushed every step, so no finished step of a killed attempt goes unrecorded.
        "train.global_batch=8", "train.micro_batch=2", f"train.log_every={args.log_every}", f"train.steps={steps}",
        f"checkpoint.every_steps={args.checkpoint_every}", "checkpoint.keep_last=2", "metrics.port=0",
        f"faults={json.dumps(kills)}",
    ]
    command = [sys.executable, "-m", "service.cli", "train", "-c", str(ROOT / "examples" / "tiny.yaml")]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    started = time.time()
    if by_clock:
        with open(Path(storage) / f"{run_name}.log", "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            injected = drive_by_clock(process, f"{storage}/{run_name}", args.wall_s, args.kill_interval_s)
        finished = time.time()
        # 143: the driver saved and stopped on the SIGTERM this benchmark sent.
        if process.returncode not in (0, 143):
            print(Path(storage, f"{run_name}.log").read_text()[-3000:])
            return process.returncode
        print(f"{injected} SIGKILLs of rank 1, one per {args.kill_interval_s:.0f} s; log {storage}/{run_name}.log")
    else:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
        finished = time.time()
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            return result.returncode

    records = read_history(f"{storage}/{run_name}")
    tracker = GoodputTracker(started_at=started)
    recoveries, lost = [], []
    previous = None
    for record in records:
        tracker.add_step(attempt=record["attempt"], step=record["step"], end_time=record["time"], duration_s=record["duration_s"])
        tracker.add_checkpoint(record.get("checkpoint_s", 0.0))
        if previous is not None and record["attempt"] != previous["attempt"]:
            recoveries.append(record["time"] - record["duration_s"] - previous["time"])
            lost.append(previous["step"] - (record["step"] - 1))
        previous = record
    parts = tracker.parts(now=finished)
    schedule = (f"SIGKILL of rank 1 every {args.kill_interval_s:.0f} s for {args.wall_s:.0f} s" if by_clock
                else f"steps {args.steps}, SIGKILL of rank 1 every {args.kill_every} steps")
    print(f"{schedule}, checkpoint every {args.checkpoint_every}")
    print(f"failures {len(recoveries)}; wall {parts['total']:.0f} s")
    if recoveries:
        print(f"recovery s: median {statistics.median(recoveries):.1f}, min {min(recoveries):.1f}, max {max(recoveries):.1f}")
        print(f"steps lost per failure: mean {statistics.fmean(lost):.1f} (checkpoint interval {args.checkpoint_every})")
    print(f"goodput {parts['productive'] / parts['total']:.1%}: "
          + ", ".join(f"{name} {parts[name]:.0f} s" for name in ("productive", "recomputed", "recovery", "checkpoint", "startup", "other")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
