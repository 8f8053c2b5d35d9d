"""Measured peak memory per rank of each parallelism strategy, against the memory planner's estimate.

Each strategy trains the model of the config for a few steps on random token
ids. The peak is the largest amount of memory live during the last step:

- on CPU, from the PyTorch profiler's memory events (``profile_memory=True``).
  Profiling starts before the model is built, so the running sum of allocations
  and frees is the absolute amount of tensor memory live in the process;
- on a GPU, from ``torch.cuda.max_memory_allocated`` after a reset at the start
  of the last step.

The planner's estimate (service/planner.py) for the same settings is printed
beside it with the relative error:

    python bench/memory_check.py                  # CPU: 2 gloo ranks (4 for hsdp and tp)
    python bench/memory_check.py --device cuda    # one GPU, world size 1
    python bench/memory_check.py --json out.json  # also write the rows as JSON

Ranks are started with ``torch.multiprocessing`` and talk over gloo (CPU) or
NCCL (GPU) on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Set before Ray is imported (through workers.train_loop); no Ray cluster is started.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from service.config import Config, config_from_dict  # noqa: E402
from service.planner import estimate_memory, plan_inputs_from_config  # noqa: E402
from workers.data import MicroBatch  # noqa: E402
from workers.model import build_model  # noqa: E402
from workers.parallel import ParallelModel, build_device_mesh, parallelize  # noqa: E402
from workers.step import apply_update, compute_gradients  # noqa: E402
from workers.train_loop import build_optimizer, model_args  # noqa: E402

# The model of the CPU check: 4 blocks, so FSDP has several units, and few tokens
# per step, so that model state and activations both weigh in the peak.
CHECK_MODEL = {"n_layers": 4, "dim": 128, "n_heads": 4, "vocab_size": 256, "seq_len": 64}
MICRO_BATCH = 1
STEPS = 3
STEP_LABEL = "stalwart.memory_check.step."
# (name, parallel settings, world size on CPU)
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("ddp", {"strategy": "ddp"}, 2),
    ("zero1", {"strategy": "zero1"}, 2),
    ("zero2", {"strategy": "zero2"}, 2),
    ("zero3", {"strategy": "zero3"}, 2),
    ("fsdp", {"strategy": "fsdp"}, 2),
    ("hsdp", {"strategy": "hsdp", "hsdp_shard_size": 2}, 4),
    ("fsdp+offload", {"strategy": "fsdp", "cpu_offload": True}, 2),
    ("fsdp+full-ac", {"strategy": "fsdp", "activation_checkpointing": "full"}, 2),
    ("ddp+selective-ac", {"strategy": "ddp", "activation_checkpointing": "selective", "checkpoint_every": 2}, 2),
    ("fsdp+bf16", {"strategy": "fsdp", "param_dtype": "bfloat16"}, 2),
    ("fsdp+tp2", {"strategy": "fsdp", "tensor_parallel_size": 2}, 4),
]


@dataclass
class Measurement:
    case: str
    world_size: int
    device: str
    measured_bytes: int
    planned_bytes: int

    @property
    def error(self) -> float:
        """(planned - measured) / measured."""
        return (self.planned_bytes - self.measured_bytes) / self.measured_bytes


def check_config(parallel: dict[str, Any], world_size: int, model: dict[str, Any] | None = None,
                 micro_batch: int = MICRO_BATCH) -> Config:
    """Return the config of one measured case: one micro-batch per data-parallel rank per step."""
    dp_size = world_size // parallel.get("tensor_parallel_size", 1)
    return config_from_dict({
        "model": model or CHECK_MODEL,
        "scaling": {"num_workers": world_size},
        "train": {"global_batch": micro_batch * dp_size, "micro_batch": micro_batch},
        "parallel": parallel,
    })


def _random_batch(config: Config, step: int, dp_rank: int) -> MicroBatch:
    generator = torch.Generator().manual_seed(1000 * step + dp_rank)
    tokens = torch.randint(0, config.model.vocab_size, (config.train.micro_batch, config.model.seq_len + 1),
                           generator=generator)
    return MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=())


def train_steps(config: Config, device: torch.device, steps: int,
                around_step: Callable[[int], Any]) -> tuple[ParallelModel, torch.optim.Optimizer]:
    """Build the model under the config's strategy and run ``steps`` steps, each inside ``around_step(step)``.

    Returns the model and the optimizer, so the caller decides when they are freed.
    """
    mesh = build_device_mesh(device.type, dist.get_world_size(), config.parallel)
    model = build_model(model_args(config), seed=config.run.seed)
    model.to(device)
    parallel = parallelize(model, config.parallel, mesh)
    optimizer = build_optimizer(parallel.module, config, parallel)
    for step in range(1, steps + 1):
        with around_step(step):
            batch = _random_batch(config, step, parallel.dp_rank)
            gradients = compute_gradients(parallel.module, [batch], device=device, fsdp_units=parallel.sync_units,
                                          sample_replicas=parallel.tp_size)
            apply_update(parallel.module, optimizer, gradients, lr=1e-3, grad_clip=1.0)
            optimizer.zero_grad(set_to_none=True)
    return parallel, optimizer


def live_storage_addresses() -> set[int]:
    """Return the data addresses of every tensor storage that Python objects still reach."""
    addresses = set()
    with warnings.catch_warnings():
        # isinstance() on torch.distributed's deprecated aliases warns; they are not tensors anyway.
        warnings.simplefilter("ignore", FutureWarning)
        for item in gc.get_objects():
            if isinstance(item, torch.Tensor):
                local = item.to_local() if isinstance(item, DTensor) else item
                if local.untyped_storage().nbytes():
                    addresses.add(local.untyped_storage().data_ptr())
    return addresses


def cpu_peak_bytes(config: Config, steps: int = STEPS) -> int:
    """Return the peak of live CPU tensor memory during the last of ``steps`` steps (profiler memory events)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        trained = train_steps(config, torch.device("cpu"), steps, lambda step: record_function(f"{STEP_LABEL}{step}"))
    alive = live_storage_addresses()
    del trained
    results = profiler.profiler.kineto_results
    last_step = [event for event in results.events() if event.name() == f"{STEP_LABEL}{steps}"]
    if not last_step:
        raise RuntimeError(f"the profiler recorded no range named {STEP_LABEL}{steps}")
    return peak_live_bytes(allocation_events(results), last_step[0].start_ns(), last_step[0].end_ns(), alive)


def allocation_events(results: Any) -> list[tuple[int, int, int]]:
    """Return (time_ns, address, bytes) of every allocation (bytes > 0) and free (bytes < 0), in time order.

    A block that a ``c10d::`` collective allocates for itself (gloo's staging copies) also gets a
    free at the end of that collective; see ``peak_live_bytes``.
    """
    events = []
    stack = [(node, None) for node in results.experimental_event_tree()]
    while stack:
        node, collective_end_ns = stack.pop()
        if node.name.startswith("c10d::"):
            collective_end_ns = node.end_time_ns
        if node.tag == _EventType.Allocation:
            size = node.extra_fields.alloc_size
            events.append((node.start_time_ns, node.extra_fields.ptr, size))
            if size > 0 and collective_end_ns is not None:
                events.append((collective_end_ns, node.extra_fields.ptr, -size))
        stack.extend((child, collective_end_ns) for child in node.children)
    return sorted(events)


def peak_live_bytes(events: list[tuple[int, int, int]], window_start_ns: int, window_end_ns: int,
                    alive_at_end: set[int] | None = None) -> int:
    """Return the largest sum of live allocations at any moment in [window_start_ns, window_end_ns].

    Allocations are matched to frees by address. The profiler records only the frees on the threads
    it profiles, and gloo drops its references to collective buffers (and to DDP's replaced
    gradient buckets) on its own threads. So a block counts as freed when its free is seen, when
    its address is allocated again, when it is a collective's own staging block and the
    collective has returned, or when it was allocated before the window and no tensor holds it
    at the end (``alive_at_end``). A block allocated inside the window and freed unseen counts
    to the end of the window, which can only raise the measured peak.
    """
    open_blocks: dict[int, int] = {}
    for index, (_, address, size) in enumerate(events):
        if size > 0:
            open_blocks[address] = index
        elif address in open_blocks and events[open_blocks[address]][2] == -size:
            del open_blocks[address]
    dropped = {index for address, index in open_blocks.items()
               if alive_at_end is not None and address not in alive_at_end and events[index][0] < window_start_ns}

    live: dict[int, int] = {}
    total = 0
    peak = 0
    for index, (time_ns, address, size) in enumerate(events):
        if time_ns > window_end_ns:
            break
        if index in dropped:
            continue
        if size > 0:
            total += size - live.get(address, 0)
            live[address] = size
        elif live.get(address) == -size:
            total -= live.pop(address)
        if time_ns >= window_start_ns:
            peak = max(peak, total)
        else:
            peak = total
    return peak


def cuda_peak_bytes(config: Config, steps: int = STEPS) -> int:
    """Return ``torch.cuda.max_memory_allocated`` over the last of ``steps`` steps."""
    # NOTE: this GPU path has not run yet; the figures in docs/benchmarks.md are CPU measurements.
    device = torch.device("cuda", torch.cuda.current_device())

    class LastStepReset:
        def __init__(self, step: int):
            self.step = step

        def __enter__(self) -> None:
            if self.step == steps:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)

        def __exit__(self, *exc: object) -> None:
            torch.cuda.synchronize(device)

    train_steps(config, device, steps, LastStepReset)
    return int(torch.cuda.max_memory_allocated(device))


def measure_cases(rank: int, world_size: int, cases: list[tuple[str, dict[str, Any]]], device_type: str,
                  output_dir: str) -> None:
    """Rank function: measure every case in this process; rank 0 writes the rows as JSON lines."""
    rows = []
    for name, parallel in cases:
        config = check_config(parallel, world_size)
        measured = cpu_peak_bytes(config) if device_type == "cpu" else cuda_peak_bytes(config)
        # Every rank's peak differs a little (uneven shards); report the largest.
        largest = torch.tensor([measured], dtype=torch.int64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        estimate = estimate_memory(plan_inputs_from_config(config, world_size))
        # On CPU, offloaded state shares the one memory with everything else.
        planned = estimate.unified_peak_bytes if device_type == "cpu" else estimate.peak_bytes
        rows.append(Measurement(name, world_size, device_type, int(largest.item()), planned))
    if rank == 0:
        with open(Path(output_dir) / f"world-{world_size}.jsonl", "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(asdict(row)) + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_rank(rank: int, world_size: int, port: int, device_type: str) -> torch.device:
    """Join the process group on 127.0.0.1 (gloo on CPU, NCCL on a GPU) and return this rank's device."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    return device


def _rank_main(rank: int, world_size: int, port: int, device_type: str, cases: list[tuple[str, dict[str, Any]]],
               output_dir: str) -> None:
    start_rank(rank, world_size, port, device_type)
    try:
        measure_cases(rank, world_size, cases, device_type, output_dir)
    finally:
        dist.destroy_process_group()


def run_cases(cases: list[tuple[str, dict[str, Any], int]], device_type: str) -> list[Measurement]:
    """Run every case at its world size (1 on a GPU) and return the measurements in case order."""
    by_world: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for name, parallel, world_size in cases:
        by_world.setdefault(1 if device_type == "cuda" else world_size, []).append((name, parallel))
    rows: dict[str, Measurement] = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for world_size, group in by_world.items():
            mp.start_processes(_rank_main, args=(world_size, free_port(), device_type, group, output_dir),
                               nprocs=world_size, join=True, start_method="spawn")
            for line in Path(output_dir, f"world-{world_size}.jsonl").read_text(encoding="utf-8").splitlines():
                row = Measurement(**json.loads(line))
                rows[row.case] = row
    return [rows[name] for name, _, _ in cases if name in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory_check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    cases = CASES
    if args.device == "cuda":
        # World size 1: tensor parallelism and HSDP need more ranks than one GPU.
        cases = [case for case in CASES if "tp" not in case[0] and case[0] != "hsdp"]
    rows = run_cases(cases, args.device)
    print(f"{'case':<20} {'ranks':>5} {'measured MiB':>13} {'planned MiB':>12} {'error':>7}")
    for row in rows:
        print(f"{row.case:<20} {row.world_size:>5} {row.measured_bytes / 2**20:>13.3f} "
              f"{row.planned_bytes / 2**20:>12.3f} {row.error:>+7.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) | {"error": row.error} for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
