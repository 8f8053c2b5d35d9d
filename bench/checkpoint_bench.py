"""Checkpoint benchmark: training stall per save (sync vs async), save throughput vs raw s3fs, load time.

Two gloo ranks on this machine train the model of a config (examples/tiny.yaml by
default, about 3.3 M parameters) on random tokens. They save every few steps to
a moto S3 server that this script starts on 127.0.0.1, and once to a local
folder for the load figure. Run from the repository root:

    .venv/bin/python bench/checkpoint_bench.py --config examples/tiny.yaml --saves 4

It prints one JSON object with every figure. The stall of a save is the time the
step loop was blocked by it: staging, waiting for an earlier save, and the
per-step polls while it ran. The raw baseline uploads the same number of bytes
per rank with s3fs's own parallel put (``pipe_file``, 8 parts in flight), timed
between barriers like the save.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# Must be set before anything imports ray (workers.train_loop does).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

from dist_helpers import run_distributed  # noqa: E402
from s3_server import MotoServer  # noqa: E402
from service.catalog import checkpoint_uri, read_commit_record  # noqa: E402
from service.config import CheckpointSection, Config, load_config  # noqa: E402
from service.storage import filesystem, join  # noqa: E402
from workers.async_save import Checkpointer  # noqa: E402
from workers.checkpoint import TrainState, load_checkpoint  # noqa: E402
from workers.data import MicroBatch  # noqa: E402
from workers.model import build_model  # noqa: E402
from workers.parallel import apply_fsdp  # noqa: E402
from workers.step import train_step  # noqa: E402
from workers.train_loop import build_optimizer, model_args  # noqa: E402

WORLD_SIZE = 2
RAW_CONCURRENCY = 8
MODES = {
    "sync": {"async_save": False},
    "async (max_inflight_steps=null)": {"async_save": True, "max_inflight_steps": None},
    "async (max_inflight_steps=1, the default)": {"async_save": True, "max_inflight_steps": 1},
}


def _train_one(model: Any, optimizer: Any, units: Any, config: Config, world_rank: int, state: TrainState) -> None:
    step = state.step + 1
    generator = torch.Generator().manual_seed(1000 * step + world_rank)
    tokens = torch.randint(0, config.model.vocab_size, (config.train.micro_batch, config.model.seq_len + 1), generator=generator)
    batch = MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=())
    train_step(model, optimizer, [batch], lr=1e-3, grad_clip=1.0, device=torch.device("cpu"), fsdp_units=units)
    state.step = step


def _run_mode(model: Any, optimizer: Any, units: Any, config: Config, world_rank: int, state: TrainState,
              run_uri: str, options: dict[str, Any], settings: dict[str, Any], saves: int, every: int) -> dict[str, Any]:
    """Train ``saves * every`` steps with a save every ``every`` steps; return stalls, save durations and step times."""
    section = CheckpointSection(every_steps=every, save_final=False, keep_last=2, **settings)
    stalls: list[float] = []
    breakdowns: list[dict[str, float]] = []
    durations: list[float] = []
    sizes: list[int] = []

    def on_commit(outcome: Any, stall_s: float) -> None:
        stalls.append(stall_s)
        breakdowns.append(dict(checkpointer.last_stall))
        durations.append(outcome.duration_s)
        sizes.append(outcome.total_bytes)

    checkpointer = Checkpointer(settings=section, run_uri=run_uri, storage_options=options, saved_config={},
                                model=model, optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE,
                                total_steps=10**9, on_commit=on_commit)
    step_times: list[float] = []
    for _ in range(saves * every):
        started = time.perf_counter()
        _train_one(model, optimizer, units, config, world_rank, state)
        step_times.append(time.perf_counter() - started)
        reason = checkpointer.due(state.step)
        if reason is not None:
            checkpointer.save(state.step, state, loss=None, reason=reason)
    checkpointer.close()
    return {"stall_s": stalls, "stall_parts": breakdowns, "save_s": durations, "bytes": sizes, "step_s": step_times}


def _raw_put(fs: Any, folder: str, num_bytes: int, world_rank: int) -> float:
    """Upload ``num_bytes`` random bytes from this rank with s3fs's parallel put; return the seconds, barrier to barrier."""
    data = os.urandom(num_bytes)
    dist.barrier()
    started = time.perf_counter()
    fs.pipe_file(join(folder, f"rank-{world_rank}"), data, chunksize=5 * 2**20, max_concurrency=RAW_CONCURRENCY)
    dist.barrier()
    return time.perf_counter() - started


def _timed_load(model: Any, optimizer: Any, checkpoint_id: str, options: dict[str, Any], world_rank: int) -> float:
    dist.barrier()
    started = time.perf_counter()
    load_checkpoint(checkpoint_id, model=model, optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE,
                    seed=0, storage_options=options)
    dist.barrier()
    return time.perf_counter() - started


def _bench_rank(world_rank: int, world_size: int, config_tree: dict[str, Any], s3_uri: str, local_uri: str,
                options: dict[str, Any], saves: int, every: int, throughput_only: bool, output: str) -> None:
    torch.set_num_threads(1)
    config = Config.model_validate(config_tree)
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(model_args(config), seed=1)
    units = apply_fsdp(model, mesh, param_dtype="float32", reduce_dtype="float32")
    optimizer = build_optimizer(model, config)
    state = TrainState()
    for _ in range(2):  # warm-up, and the optimizer state exists before the first save
        _train_one(model, optimizer, units, config, world_rank, state)

    results: dict[str, Any] = {}
    for name, settings in ({} if throughput_only else MODES).items():
        results[name] = _run_mode(model, optimizer, units, config, world_rank, state, join(s3_uri, name.split()[0] + str(len(results))),
                                  options, settings, saves, every)

    # Throughput: synchronous saves, each followed by a raw put of the same bytes per rank, alternating
    # so that both see the same load from other processes on the machine.
    fs = filesystem(s3_uri, options)
    sync_run = join(s3_uri, "sync0")
    throughput: dict[str, dict[str, list[float]]] = {}
    for part_mib in (64, 5):
        settings = CheckpointSection(every_steps=None, save_final=False, keep_last=1, async_save=False,
                                     upload_part_bytes=part_mib * 2**20)
        durations: list[float] = []

        def on_commit(outcome: Any, stall_s: float) -> None:
            durations.append(outcome.duration_s)

        run = join(s3_uri, f"throughput-{part_mib}")
        checkpointer = Checkpointer(settings=settings, run_uri=run, storage_options=options, saved_config={}, model=model,
                                    optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE, total_steps=10**9,
                                    on_commit=on_commit)
        raw: list[float] = []
        for index in range(3):
            state.step += 1
            checkpointer.save(state.step, state, loss=None)
            record = read_commit_record(fs, checkpoint_uri(run, state.step))
            rank_bytes = sum(entry.size_bytes for name, entry in record.files.items() if name.startswith(f"__{world_rank}_"))
            if world_rank == 0:
                rank_bytes += sum(entry.size_bytes for name, entry in record.files.items() if not name.startswith("__"))
            raw.append(_raw_put(fs, join(s3_uri, f"raw-{part_mib}-{index}"), rank_bytes, world_rank))
        checkpointer.close()
        throughput[f"{part_mib} MiB parts"] = {"save_s": durations, "raw_s": raw}
    if throughput_only:
        if world_rank == 0:
            Path(output).write_text(json.dumps({"modes": {}, "throughput": throughput, "checkpoint_bytes": record.total_bytes}))
        return
    last = max(int(path.rstrip("/").rsplit("-", 1)[-1]) for path in fs.ls(join(sync_run, "checkpoints"), refresh=True) if "step-" in path)
    record = read_commit_record(fs, checkpoint_uri(sync_run, last))

    # Load times: the same checkpoint from S3 and from a local folder.
    fresh_model = build_model(model_args(config), seed=2)
    apply_fsdp(fresh_model, mesh, param_dtype="float32", reduce_dtype="float32")
    fresh_optimizer = build_optimizer(fresh_model, config)
    local_section = CheckpointSection(every_steps=None, save_final=False, async_save=False)
    local = Checkpointer(settings=local_section, run_uri=local_uri, storage_options={}, saved_config={}, model=model,
                         optimizer=optimizer, world_rank=world_rank, world_size=WORLD_SIZE, total_steps=10**9)
    local.save(state.step, state, loss=None, reason="final")
    local.close()
    load_s3 = [_timed_load(fresh_model, fresh_optimizer, checkpoint_uri(sync_run, last), options, world_rank) for _ in range(3)]
    load_local = [_timed_load(fresh_model, fresh_optimizer, checkpoint_uri(local_uri, state.step), {}, world_rank) for _ in range(3)]

    if world_rank == 0:
        Path(output).write_text(json.dumps({"modes": results, "throughput": throughput, "checkpoint_bytes": record.total_bytes,
                                            "load_s3_s": load_s3, "load_local_s": load_local}))


def summarize(raw: dict[str, Any], params: int) -> dict[str, Any]:
    modes = raw["modes"]
    summary: dict[str, Any] = {"parameters": params, "checkpoint_mb": raw["checkpoint_bytes"] / 1e6}
    if modes:
        sync_save = statistics.median(modes["sync"]["save_s"])
        summary["median_step_s_sync_mode"] = statistics.median(modes["sync"]["step_s"])
    for name, result in modes.items():
        stall = statistics.median(result["stall_s"])
        summary[name] = {
            "median_stall_s": round(stall, 4),
            "stall_over_sync_save": round(stall / sync_save, 4),
            "median_background_save_s": round(statistics.median(result["save_s"]), 3),
            "median_step_s": round(statistics.median(result["step_s"]), 4),
            "mean_stall_s": round(statistics.fmean(result["stall_s"]), 4),
            "stalls_s": [round(value, 4) for value in result["stall_s"]],
            "median_stall_parts_s": {part: round(statistics.median(item[part] for item in result["stall_parts"]), 4)
                                     for part in ("stage_s", "poll_s", "wait_s")},
        }
    megabytes = raw["checkpoint_bytes"] / 1e6
    for name, pairs in raw["throughput"].items():
        save_s, raw_s = statistics.median(pairs["save_s"]), statistics.median(pairs["raw_s"])
        summary[f"throughput, {name}"] = {
            "save_mb_s": round(megabytes / save_s, 1), "raw_s3fs_put_mb_s": round(megabytes / raw_s, 1),
            "save_over_raw": round(raw_s / save_s, 3),
            "pairs_s": [[round(a, 3), round(b, 3)] for a, b in zip(pairs["save_s"], pairs["raw_s"])],
        }
    if "load_s3_s" in raw:
        summary["median_load_s3_s"] = round(statistics.median(raw["load_s3_s"]), 3)
        summary["median_load_local_s"] = round(statistics.median(raw["load_local_s"]), 3)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=str(ROOT / "examples" / "tiny.yaml"), help="YAML config whose model is benchmarked")
    parser.add_argument("--saves", type=int, default=4, help="saves per mode")
    parser.add_argument("--every", type=int, default=4, help="steps between saves")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="limit for the whole benchmark, in seconds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.dim=512 (repeatable)")
    parser.add_argument("--throughput-only", action="store_true", help="measure only save throughput against the raw put")
    args = parser.parse_args()

    config = load_config(args.config, [*args.overrides, f"scaling.num_workers={WORLD_SIZE}"])
    params = sum(parameter.numel() for parameter in build_model(model_args(config), seed=0).parameters())
    with tempfile.TemporaryDirectory(prefix="stalwart-checkpoint-bench-") as folder:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench-key-id")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        server = MotoServer(Path(folder) / "moto.log")
        server.start()
        try:
            bucket = server.create_bucket()
            output = str(Path(folder) / "result.json")
            run_distributed(_bench_rank, WORLD_SIZE, config.model_dump(mode="json"), f"s3://{bucket}/bench",
                            str(Path(folder) / "local"), server.storage_options(), args.saves, args.every,
                            args.throughput_only, output,
                            timeout_s=args.timeout_s)
            raw = json.loads(Path(output).read_text())
        finally:
            server.stop()
    print(json.dumps(summarize(raw, params), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
