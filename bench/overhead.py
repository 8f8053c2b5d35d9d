"""Stalwart's throughput against the bare FSDP2 loop, and the cost of checkpointing.

One invocation alternates runs of bench/bare_fsdp.py (under torch.distributed.run)
and `stalwart train` with checkpoints off and metrics on, all with the same
config, then runs Stalwart once more with a checkpoint every N steps. Every
run gets its own run name under one storage folder, so the dataset is prepared
once and no run resumes another.

Throughput is steady state: the tokens of the steps after ``--warmup-steps``
over the wall time from the end of that step to the end of the last step. Both
sides use the per-step wall-clock time of rank 0 (bare: its JSON lines,
Stalwart: its step history), so start-up is excluded the same way. A separate
in-process timing gives the host cost of Stalwart's reporting per step.

    python bench/overhead.py --config examples/tiny.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# Set before anything imports Ray, in this process and in the `stalwart train` processes it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.bare_fsdp import steady_tokens_per_second  # noqa: E402
from service.config import Config, load_config  # noqa: E402
from workers.faults import fire_kill_faults, spike_multiplier  # noqa: E402
from workers.reporting import ProgressReporter, StepRecord, read_history  # noqa: E402
from workers.train_loop import build_spike_monitor  # noqa: E402

SAVE_SECONDS_PATTERN = re.compile(r"checkpoint committed in ([0-9.]+) s")


def median_step_tokens_per_second(records: list[dict[str, Any]], warmup_steps: int) -> float | None:
    """Return the tokens of a step over the median step time after ``warmup_steps``, or None with too few steps.

    A step's time is the gap between its record and the one before, so a step
    slowed by another process on the machine moves the median little. Costs
    that recur every few steps (a history flush, a checkpoint) move it little
    too, so this figure complements the steady window and does not replace it.
    """
    if warmup_steps < 1 or len(records) < warmup_steps + 2:
        return None
    gaps_s = [later["time"] - earlier["time"] for earlier, later in zip(records[warmup_steps - 1:], records[warmup_steps:])]
    return records[-1]["tokens"] / statistics.median(gaps_s)


@dataclass
class RunResult:
    kind: str  # "bare", "stalwart" or "stalwart+checkpoints"
    run_name: str
    records: list[dict[str, Any]]
    warmup_steps: int
    wall_s: float  # the whole process, start-up included
    save_seconds: list[float] = field(default_factory=list)
    # 1-minute load average when the run ended, its own processes included: far above the
    # number of ranks means other work shared the CPUs and the figures are not comparable.
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def steady_tokens_per_second(self) -> float | None:
        return steady_tokens_per_second(self.records, self.warmup_steps)

    @property
    def median_step_tokens_per_second(self) -> float | None:
        return median_step_tokens_per_second(self.records, self.warmup_steps)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this ran."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``command`` in its own process group and return its stdout and stderr; kill the group on timeout."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise RuntimeError(f"command timed out after {timeout_s:.0f} s (raise --timeout-s): {' '.join(command)}\n"
                           f"last output:\n{output[-4000:]}") from None
    if process.returncode != 0:
        raise RuntimeError(f"command failed with exit status {process.returncode}: {' '.join(command)}\n"
                           f"last output:\n{output[-4000:]}")
    return output


def override_arguments(overrides: list[str]) -> list[str]:
    arguments: list[str] = []
    for override in overrides:
        arguments += ["--set", override]
    return arguments


def config_arguments(config: str | None) -> list[str]:
    return ["--config", config] if config else []


def bare_command(config: str | None, overrides: list[str], num_workers: int, warmup_steps: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(num_workers),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(REPO_ROOT / "bench" / "bare_fsdp.py"), *config_arguments(config), *override_arguments(overrides),
        "--warmup-steps", str(warmup_steps),
    ]


def stalwart_command(config: str | None, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "service.cli", "train", *config_arguments(config), *override_arguments(overrides)]


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if sys.platform.startswith("linux"):
        # Keep gloo's connections on loopback whatever the host name resolves to.
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def parse_bare_output(output: str) -> list[dict[str, Any]]:
    """Return the per-step JSON records that rank 0 of bench/bare_fsdp.py printed, in step order."""
    records = []
    for line in output.splitlines():
        if line.startswith("{") and '"step"' in line and '"summary"' not in line:
            records.append(json.loads(line))
    return sorted(records, key=lambda record: record["step"])


def run_bare(config: str | None, overrides: list[str], num_workers: int, warmup_steps: int,
             timeout_s: float) -> RunResult:
    started = time.monotonic()
    output = run_command(bare_command(config, overrides, num_workers, warmup_steps), timeout_s, child_environment())
    records = parse_bare_output(output)
    return RunResult("bare", "bare", records, warmup_steps, time.monotonic() - started)


def run_stalwart(kind: str, config: str | None, overrides: list[str], run_uri: str, warmup_steps: int,
                 timeout_s: float) -> RunResult:
    started = time.monotonic()
    output = run_command(stalwart_command(config, overrides), timeout_s, child_environment())
    records = read_history(run_uri)
    if any(record["attempt"] != 1 for record in records):
        # A restart re-runs steps after a gap, so the wall-clock window would not measure training.
        raise RuntimeError(f"run {run_uri} restarted after a failure; its throughput is not comparable, run again")
    saves = [float(seconds) for seconds in SAVE_SECONDS_PATTERN.findall(output)]
    return RunResult(kind, run_uri.rsplit("/", 1)[-1], records, warmup_steps, time.monotonic() - started, saves)


def time_host_extras(config: Config, folder: str, steps: int) -> dict[str, float]:
    """Return the mean host microseconds per step of each per-step extra of Stalwart's rank 0, timed here.

    The extras are the fault checks, the spike monitor and the progress
    reporter (records, a history part and a log line every
    ``train.log_every`` steps). The metrics actor is left out because it
    needs Ray: rank 0 sends it one non-blocking ``.remote()`` call per
    logging interval.
    """
    run_uri = os.path.join(folder, "host-extras-timing")
    reporter = ProgressReporter(run_name="host-extras-timing", run_uri=run_uri, attempt=1, world_size=2,
                                storage_options={}, metrics_actor=None, total_steps=steps)
    monitor = build_spike_monitor(config)
    elapsed_s = {"faults": 0.0, "stability": 0.0, "reporting": 0.0}
    for step in range(1, steps + 1):
        loss, grad_norm = 3.0 + 0.01 * math.sin(step), 1.0 + 0.01 * math.cos(step)

        started = time.perf_counter()
        fire_kill_faults(config, run_uri, {}, step, 0)
        spike_multiplier(config, run_uri, {}, step, 0)
        elapsed_s["faults"] += time.perf_counter() - started

        started = time.perf_counter()
        monitor.check(step, loss, grad_norm)
        elapsed_s["stability"] += time.perf_counter() - started

        started = time.perf_counter()
        reporter.add(StepRecord(step=step, loss=loss, grad_norm=grad_norm, lr=1e-3, tokens=4096, skipped=False,
                                attempt=1, world_size=2, time=time.time()))
        if step % config.train.log_every == 0 or step == steps:
            reporter.flush()
        elapsed_s["reporting"] += time.perf_counter() - started
    return {name: seconds / steps * 1e6 for name, seconds in elapsed_s.items()}


def median_rate(results: list[RunResult], figure: str = "steady_tokens_per_second") -> float | None:
    """Return the median over runs of one throughput figure (a RunResult property name)."""
    rates = [getattr(result, figure) for result in results if getattr(result, figure)]
    return statistics.median(rates) if rates else None


def saves_in_window(steps: int, warmup_steps: int, every: int) -> int:
    """Count the saves whose time falls inside the measured window.

    A save after step s delays the record of step s + 1, so saves after steps
    ``warmup_steps`` .. ``steps - 1`` are inside it.
    """
    return sum(1 for step in range(warmup_steps, steps) if step % every == 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=str(REPO_ROOT / "examples" / "tiny.yaml"),
                        help="YAML config for every run (default examples/tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="first steps left out of tokens/s (default 5)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="bare/Stalwart pairs, run alternately (default 2)")
    parser.add_argument("--checkpoint-every", type=int, default=5,
                        help="checkpoint interval in steps of the checkpointing run; 0 skips that run (default 5)")
    parser.add_argument("--num-workers", type=int, default=2, help="ranks of every run (default 2)")
    parser.add_argument("--storage", help="storage folder for the dataset and the runs (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary storage folder")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit for each run in seconds (default 900)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < args.warmup_steps + 2:
        print(f"overhead: --steps={args.steps} leaves fewer than 2 steps after --warmup-steps={args.warmup_steps}; "
              "raise --steps", file=sys.stderr)
        return 2
    storage = args.storage or tempfile.mkdtemp(prefix="stalwart-overhead-")
    storage = os.path.abspath(storage)
    common = [*args.overrides, f"storage.uri={storage}", f"train.steps={args.steps}",
              f"scaling.num_workers={args.num_workers}"]
    stalwart_common = [*common, "checkpoint.save_final=false", "metrics.enabled=true", "metrics.port=0"]
    try:
        results = run_all(args, storage, common, stalwart_common)
    finally:
        if args.storage is None and not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    print_report(args, results)
    return 0


def run_all(args: argparse.Namespace, storage: str, common: list[str],
            stalwart_common: list[str]) -> dict[str, Any]:
    # A run name that exists in storage would resume that run, so every invocation uses new names.
    prefix = f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    bare: list[RunResult] = []
    stalwart: list[RunResult] = []
    for round_index in range(1, args.repeats + 1):
        bare.append(run_bare(args.config, common, args.num_workers, args.warmup_steps, args.timeout_s))
        log_result(round_index, bare[-1])
        name = f"{prefix}-plain-{round_index}"
        overrides = [*stalwart_common, f"run.name={name}", "checkpoint.every_steps=null"]
        stalwart.append(run_stalwart("stalwart", args.config, overrides, f"{storage}/{name}",
                                     args.warmup_steps, args.timeout_s))
        log_result(round_index, stalwart[-1])

    checkpointed = None
    if args.checkpoint_every > 0:
        name = f"{prefix}-checkpoints"
        overrides = [*stalwart_common, f"run.name={name}", f"checkpoint.every_steps={args.checkpoint_every}"]
        checkpointed = run_stalwart("stalwart+checkpoints", args.config, overrides, f"{storage}/{name}",
                                    args.warmup_steps, args.timeout_s)
        log_result(args.repeats + 1, checkpointed)

    host_extras_us = time_host_extras(load_config(args.config, stalwart_common), storage, 200)
    return {"bare": bare, "stalwart": stalwart, "checkpointed": checkpointed, "host_extras_us": host_extras_us}


def log_result(round_index: int, result: RunResult) -> None:
    print(f"round {round_index} {result.kind:<21} steady tokens/s {format_rate(result.steady_tokens_per_second):>9}, "
          f"at the median step {format_rate(result.median_step_tokens_per_second):>9} "
          f"(process wall {result.wall_s:.1f} s, load average {result.load_average:.1f})", flush=True)


def format_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:,.0f}"


def print_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    summary: dict[str, Any] = {"steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats}
    summary.update(report_throughput(results))
    summary.update(report_host_extras(results, summary["bare_median"]))
    summary.update(report_checkpoints(args, results["checkpointed"], summary["stalwart_median"]))
    print(json.dumps({"summary": summary}))


def report_throughput(results: dict[str, Any]) -> dict[str, Any]:
    """Print and return the bare and Stalwart throughput figures and their ratios."""
    bare_rate = median_rate(results["bare"])
    stalwart_rate = median_rate(results["stalwart"])
    ratio = stalwart_rate / bare_rate if bare_rate and stalwart_rate else None
    # Each Stalwart run against the bare run just before it; the spread shows how noisy the machine is.
    round_ratios = [
        stalwart_run.steady_tokens_per_second / bare_run.steady_tokens_per_second
        for bare_run, stalwart_run in zip(results["bare"], results["stalwart"])
        if bare_run.steady_tokens_per_second and stalwart_run.steady_tokens_per_second
    ]
    bare_median_step = median_rate(results["bare"], "median_step_tokens_per_second")
    stalwart_median_step = median_rate(results["stalwart"], "median_step_tokens_per_second")
    median_step_ratio = stalwart_median_step / bare_median_step if bare_median_step and stalwart_median_step else None

    ratio_text = "n/a" if ratio is None else f"{ratio:.3f}"
    print(f"median steady tokens/s: bare {format_rate(bare_rate)}, stalwart {format_rate(stalwart_rate)}, "
          f"ratio stalwart/bare {ratio_text} (target >= 0.98)")
    print("ratio per round: " + ", ".join(f"{value:.3f}" for value in round_ratios))
    if median_step_ratio is not None:
        print(f"tokens/s at the median step: bare {format_rate(bare_median_step)}, stalwart "
              f"{format_rate(stalwart_median_step)}, ratio {median_step_ratio:.3f}")
    return {
        "bare_tokens_per_second": [result.steady_tokens_per_second for result in results["bare"]],
        "stalwart_tokens_per_second": [result.steady_tokens_per_second for result in results["stalwart"]],
        "bare_median_step_tokens_per_second": [result.median_step_tokens_per_second for result in results["bare"]],
        "stalwart_median_step_tokens_per_second": [result.median_step_tokens_per_second for result in results["stalwart"]],
        "bare_median": bare_rate, "stalwart_median": stalwart_rate, "ratio": ratio, "round_ratios": round_ratios,
        "load_averages": [result.load_average for pair in zip(results["bare"], results["stalwart"]) for result in pair],
        "median_step_ratio": median_step_ratio,
    }


def report_host_extras(results: dict[str, Any], bare_rate: float | None) -> dict[str, Any]:
    extras = results["host_extras_us"]
    parts = ", ".join(f"{name} {micros:.0f}" for name, micros in extras.items())
    line = f"host extras of Stalwart's rank 0, us per step: {parts}"
    if bare_rate:
        step_us = results["bare"][0].records[-1]["tokens"] / bare_rate * 1e6
        line += f" (together {sum(extras.values()) / step_us:.2%} of a bare step)"
    print(line)
    return {"host_extras_us_per_step": extras}


def report_checkpoints(args: argparse.Namespace, checkpointed: RunResult | None,
                       stalwart_rate: float | None) -> dict[str, Any]:
    if checkpointed is None or not checkpointed.steady_tokens_per_second or not stalwart_rate:
        return {}
    figures = checkpoint_figures(args, checkpointed, stalwart_rate)
    print(f"checkpoint every {args.checkpoint_every} steps: {format_rate(checkpointed.steady_tokens_per_second)} "
          f"tokens/s, ratio to Stalwart without checkpoints {figures['checkpoint_ratio']:.3f}; "
          f"{figures['saves_in_window']} saves in the window")
    if figures["extra_s_per_save"] is not None:
        logged = statistics.mean(checkpointed.save_seconds) if checkpointed.save_seconds else float("nan")
        print(f"  extra wall time per save {figures['extra_s_per_save']:.2f} s; save time logged by Stalwart "
              f"{logged:.2f} s on average")
    return figures


def checkpoint_figures(args: argparse.Namespace, checkpointed: RunResult, stalwart_rate: float) -> dict[str, Any]:
    """Compare the checkpointing run with the median Stalwart run without checkpoints."""
    rate = checkpointed.steady_tokens_per_second
    saves = saves_in_window(args.steps, args.warmup_steps, args.checkpoint_every)
    tokens = sum(record["tokens"] for record in checkpointed.records[args.warmup_steps:])
    extra_s = tokens / rate - tokens / stalwart_rate
    return {
        "checkpoint_every": args.checkpoint_every, "checkpointed_tokens_per_second": rate,
        "checkpoint_ratio": rate / stalwart_rate, "saves_in_window": saves,
        "extra_s_per_save": extra_s / saves if saves else None, "logged_save_s": checkpointed.save_seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
