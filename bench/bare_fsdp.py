"""Bare FSDP2 training loop: the baseline that Stalwart's throughput is measured against.

It runs the same work as a Stalwart worker, with the same code:

- the model (workers/model.py) and its FSDP2 wrapping (workers/parallel.py);
- the data order (workers/data.py) over a dataset prepared by service/prepare.py;
- the optimizer (workers/train_loop.py) and the LR schedule (workers/schedule.py);
- ``train_step`` (workers/step.py), which calls the gradient and update
  functions a Stalwart worker calls.

It has no Ray cluster, checkpoints, metrics, history files or spike monitor.
Rank 0 prints one JSON line per step and a summary line:

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 \\
        bench/bare_fsdp.py --config examples/tiny.yaml --set train.steps=20

The work stays equal to Stalwart's while Stalwart's spike monitor takes no
action. It decides nothing in the first ``stability.window`` steps, and later a
detected spike makes Stalwart skip or roll back a step where this loop applies
it. Importing workers/train_loop.py imports ``ray.train``, but no Ray cluster
is started or joined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder is on sys.path but the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Set before Ray is imported (through workers.train_loop) so that nothing Ray could start binds beyond loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from service.config import Config, ConfigError, load_config  # noqa: E402
from service.prepare import prepare_dataset  # noqa: E402
from service.storage import absolute_uri  # noqa: E402
from workers.checkpoint import seed_rank_rng  # noqa: E402
from workers.data import SampleOrder, TokenDataset, rank_micro_batches  # noqa: E402
from workers.model import build_model  # noqa: E402
from workers.parallel import apply_fsdp  # noqa: E402
from workers.schedule import lr_multiplier  # noqa: E402
from workers.step import train_step  # noqa: E402
from workers.train_loop import build_optimizer, model_args  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", help="YAML config file, the same file `stalwart train` takes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set train.steps=20 (repeatable)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="steps left out of the steady-state tokens/s of the summary line (default 3)")
    return parser.parse_args(argv)


def load_for_world(args: argparse.Namespace, world_size: int) -> Config:
    """Load the config with scaling.num_workers set to the launcher's world size, so batch checks use it."""
    config = load_config(args.config, [*args.overrides, f"scaling.num_workers={world_size}"])
    if config.parallel.param_dtype == "float16":
        # train_step has no loss scaler; Stalwart's float16 path does, so the work would differ.
        raise ConfigError("parallel.param_dtype='float16' is not supported by the bare loop; use 'bfloat16' or 'float32'")
    if config.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu=true but torch.cuda.is_available() is False; set scaling.use_gpu=false")
    return config


def learning_rate(config: Config, step: int) -> float:
    """Return the LR of ``step`` from the same schedule call a Stalwart worker makes."""
    schedule = config.schedule
    return config.optim.lr * lr_multiplier(
        schedule.name, step, warmup_steps=schedule.warmup_steps, total_steps=config.train.steps,
        min_ratio=schedule.min_lr_ratio, decay_ratio=schedule.decay_ratio, decay_shape=schedule.decay_shape,
    )


def shared_dataset_uri(config: Config, world_rank: int) -> str:
    """Prepare the dataset on rank 0 (or reuse it) and share its URI with every rank."""
    holder: list[Any] = [None]
    if world_rank == 0:
        holder[0] = prepare_dataset(config.data, absolute_uri(config.storage.uri), config.storage.options)
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def steady_tokens_per_second(records: list[dict[str, Any]], warmup_steps: int) -> float | None:
    """Return the tokens of the steps after ``warmup_steps`` over the wall time from the end of that step to the last.

    Return None when fewer than two steps are left to measure.
    """
    if warmup_steps < 1 or len(records) < warmup_steps + 2:
        return None
    start = records[warmup_steps - 1]
    measured = records[warmup_steps:]
    elapsed_s = measured[-1]["time"] - start["time"]
    return sum(record["tokens"] for record in measured) / elapsed_s


def emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        config = load_for_world(args, world_size)
    except ConfigError as error:
        if world_rank == 0:
            print(f"bare_fsdp: {error}", file=sys.stderr)
        return 2

    # Device and threads exactly as a Stalwart worker sets them.
    if config.scaling.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run(config, args.warmup_steps, world_rank, world_size, device)
    except ConfigError as error:
        if world_rank == 0:
            print(f"bare_fsdp: {error}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


def run(config: Config, warmup_steps: int, world_rank: int, world_size: int, device: torch.device) -> None:
    mesh = init_device_mesh(device.type, (world_size,))
    dataset_uri = shared_dataset_uri(config, world_rank)

    model = build_model(model_args(config), seed=config.run.seed)
    model.to(device)
    fsdp_units = apply_fsdp(model, mesh, param_dtype=config.parallel.param_dtype, reduce_dtype=config.parallel.reduce_dtype)
    optimizer = build_optimizer(model, config, device_type=device.type)
    seed_rank_rng(config.run.seed, 0, world_rank, world_size)

    dataset = TokenDataset(dataset_uri, config.model.seq_len, config.storage.options)
    if config.model.vocab_size < dataset.manifest["vocab_size"]:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
                          f"{dataset.manifest['vocab_size']}; raise model.vocab_size")
    order = SampleOrder(dataset.num_samples, config.run.seed)

    records: list[dict[str, Any]] = []
    started = time.time()
    for step in range(1, config.train.steps + 1):
        step_started = time.perf_counter()
        indices = order.global_batch(step, config.train.global_batch)
        micro_batches = [
            dataset.micro_batch(chunk)
            for chunk in rank_micro_batches(indices, world_rank, world_size, config.train.micro_batch)
        ]
        lr = learning_rate(config, step)
        result = train_step(model, optimizer, micro_batches, lr=lr, grad_clip=config.train.grad_clip,
                            device=device, fsdp_units=fsdp_units)
        # train_step reads the loss back to the host before the optimizer step, so on a GPU that
        # step may still run here. Stalwart's step history is timed the same way.
        step_s = time.perf_counter() - step_started
        if world_rank == 0:
            record = {"step": step, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
                      "tokens": result.target_tokens, "skipped": result.skipped, "step_s": step_s,
                      "tokens_per_second": result.target_tokens / step_s, "time": time.time()}
            records.append(record)
            emit(record)

    if world_rank == 0:
        emit({"summary": True, "steps": config.train.steps, "world_size": world_size, "wall_s": time.time() - started,
              "warmup_steps": warmup_steps, "steady_tokens_per_second": steady_tokens_per_second(records, warmup_steps)})


if __name__ == "__main__":
    sys.exit(main())
