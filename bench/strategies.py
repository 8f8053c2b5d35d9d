"""Throughput and peak memory of each parallelism strategy on a tiny model, as ratios against ``fsdp``.

Every case trains the same model on random token ids with one micro-batch per
data-parallel rank per step. Throughput is steady state: the tokens of the
steps after ``--warmup-steps`` over the wall time from the end of the warm-up
to the end of the last step, on rank 0. The cases run in turn, ``--repeats``
rounds, so that load from other processes spreads over all of them, and the
median round counts. Peak memory is bench/memory_check.py's measurement (the
profiler on CPU, ``torch.cuda.max_memory_allocated`` on a GPU):

    python bench/strategies.py                         # CPU, 2 gloo ranks (4 for hsdp and tp)
    python bench/strategies.py --steps 30 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.memory_check import CASES, check_config, cpu_peak_bytes, cuda_peak_bytes, free_port, start_rank, train_steps  # noqa: E402

BENCH_MODEL = {"n_layers": 4, "dim": 256, "n_heads": 8, "vocab_size": 264, "seq_len": 128}
MICRO_BATCH = 2
# Ratios compare cases at the same world size, so 4-rank cases get a 4-rank fsdp baseline.
BENCH_CASES = [*CASES, ("fsdp-4-ranks", {"strategy": "fsdp"}, 4)]


def time_case(parallel: dict[str, Any], world_size: int, device: torch.device, steps: int, warmup_steps: int) -> float:
    """Train ``steps`` steps and return rank 0's steady tokens/s (all ranks return the same value)."""
    config = check_config(parallel, world_size, model=BENCH_MODEL, micro_batch=MICRO_BATCH)
    ends: dict[int, float] = {}

    @contextmanager
    def timed(step: int) -> Any:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends[step] = time.perf_counter()

    train_steps(config, device, steps, timed)
    tokens_per_step = config.train.global_batch * config.model.seq_len
    rate = torch.tensor([tokens_per_step * (steps - warmup_steps) / (ends[steps] - ends[warmup_steps])])
    dist.broadcast(rate, src=0)
    return float(rate.item())


def bench_rank(rank: int, world_size: int, port: int, device_type: str, cases: list[tuple[str, dict[str, Any]]],
               steps: int, warmup_steps: int, repeats: int, output_dir: str) -> None:
    device = start_rank(rank, world_size, port, device_type)
    try:
        rates: dict[str, list[float]] = {name: [] for name, _ in cases}
        for _ in range(repeats):
            for name, parallel in cases:
                rates[name].append(time_case(parallel, world_size, device, steps, warmup_steps))
        peaks = {}
        for name, parallel in cases:
            config = check_config(parallel, world_size, model=BENCH_MODEL, micro_batch=MICRO_BATCH)
            peak = cpu_peak_bytes(config) if device_type == "cpu" else cuda_peak_bytes(config)
            largest = torch.tensor([peak], dtype=torch.int64)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            peaks[name] = int(largest.item())
        if rank == 0:
            rows = {name: {"tokens_per_s": rates[name], "peak_bytes": peaks[name]} for name, _ in cases}
            Path(output_dir, f"world-{world_size}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("strategies: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if not 0 < args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be between 0 and --steps")

    by_world: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for name, parallel, world_size in BENCH_CASES:
        if args.device == "cuda" and ("tp" in name or name == "hsdp"):
            continue  # one GPU: world size 1
        by_world.setdefault(1 if args.device == "cuda" else world_size, []).append((name, parallel))
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for world_size, cases in by_world.items():
            mp.start_processes(bench_rank, args=(world_size, free_port(), args.device, cases, args.steps,
                                                 args.warmup_steps, args.repeats, output_dir),
                               nprocs=world_size, join=True, start_method="spawn")
            for name, row in json.loads(Path(output_dir, f"world-{world_size}.json").read_text()).items():
                rows[name] = {**row, "world_size": world_size}

    baselines = {row["world_size"]: row for name, row in rows.items() if name in ("fsdp", "fsdp-4-ranks")}
    print(f"{'case':<20} {'ranks':>5} {'tokens/s':>10} {'vs fsdp':>8} {'peak MiB':>9} {'vs fsdp':>8}  rounds")
    for name, row in rows.items():
        baseline = baselines[row["world_size"]]
        rate = statistics.median(row["tokens_per_s"])
        row["throughput_ratio"] = rate / statistics.median(baseline["tokens_per_s"])
        row["peak_ratio"] = row["peak_bytes"] / baseline["peak_bytes"]
        rounds = ", ".join(f"{value:,.0f}" for value in row["tokens_per_s"])
        print(f"{name:<20} {row['world_size']:>5} {rate:>10,.0f} {row['throughput_ratio']:>8.2f} "
              f"{row['peak_bytes'] / 2**20:>9.2f} {row['peak_ratio']:>8.2f}  {rounds}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
