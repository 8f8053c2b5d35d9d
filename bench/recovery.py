"""Recovery benchmark: kill a worker repeatedly and measure what each failure costs.

Runs `stalwart train` once with a SIGKILL of rank 1 every ``--kill-every`` steps and reads
the step history afterwards. Prints, per failure: recovery seconds (last step of the
failed attempt to the first step of the next), steps lost (recomputed), and for the run:
goodput and its parts.

    python bench/recovery.py --steps 600 --kill-every 60 --checkpoint-every 20

On 2 CPU cores a tiny model makes ~4 steps/s, so 600 steps are a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.goodput import GoodputTracker  # noqa: E402
from workers.reporting import read_history  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--kill-every", type=int, default=60, help="steps between injected SIGKILLs of rank 1")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--storage", default=None, help="storage root (default: a temporary folder)")
    parser.add_argument("--timeout-s", type=float, default=3600)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    storage = args.storage or tempfile.mkdtemp(prefix="stalwart-recovery-")
    run_name = f"recovery-{int(time.time())}"
    kills = [{"kind": "kill", "rank": 1, "step": step} for step in range(args.kill_every, args.steps, args.kill_every)]
    overrides = [
        f"run.name={run_name}", f"storage.uri={storage}", "run.max_failures=100",
        "model.n_layers=2", "model.dim=64", "model.seq_len=64", "data.max_files=40",
        # Flush the history every step, so no finished step of a killed attempt goes unrecorded.
        "train.global_batch=8", "train.micro_batch=2", "train.log_every=1", f"train.steps={args.steps}",
        f"checkpoint.every_steps={args.checkpoint_every}", "checkpoint.keep_last=2", "metrics.port=0",
        f"faults={json.dumps(kills)}",
    ]
    command = [sys.executable, "-m", "service.cli", "train", "-c", str(ROOT / "examples" / "tiny.yaml")]
    for override in overrides:
        command += ["--set", override]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    started = time.time()
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
    print(f"steps {args.steps}, SIGKILL of rank 1 every {args.kill_every} steps, checkpoint every {args.checkpoint_every}")
    print(f"failures {len(recoveries)}; wall {parts['total']:.0f} s")
    if recoveries:
        print(f"recovery s: median {statistics.median(recoveries):.1f}, min {min(recoveries):.1f}, max {max(recoveries):.1f}")
        print(f"steps lost per failure: mean {statistics.fmean(lost):.1f} (checkpoint interval {args.checkpoint_every})")
    print(f"goodput {parts['productive'] / parts['total']:.1%}: "
          + ", ".join(f"{name} {parts[name]:.0f} s" for name in ("productive", "recomputed", "recovery", "checkpoint", "startup", "other")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
