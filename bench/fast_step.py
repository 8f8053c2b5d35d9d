"""The effect of each fast-step change on the step time, one change at a time against a baseline.

Two gloo ranks train the model of ``--config`` with Stalwart's own pieces
(``parallelize``, ``build_optimizer``, ``BatchPrefetcher``, ``compute_gradients``,
``apply_update``). Each case is the baseline with one change:

- ``baseline``: foreach AdamW, no prefetch, eager, and one extra blocking
  all-reduce of the token count before forward, read back to the host. That
  extra collective is how the step counted tokens before the change that moved
  the count into the collective after backward.
- ``no_pre_forward_sync``: without that extra collective;
- ``fused_adamw``: ``optim.implementation=fused``;
- ``prefetch``: the next step's micro-batches read in a background thread;
- ``compile``: ``train.compile=true`` (torch.compile per block);
- ``baseline_s3`` and ``prefetch_s3`` (with ``--s3``): the same two with the dataset
  on a moto S3 server on 127.0.0.1, read with s3fs, as a run on object storage would.

Every case keeps its model, optimizer and data position across rounds. The
cases run in turn, ``--rounds`` times, so load from other processes spreads
over all of them. A round of a case is ``--steps`` steps after
``--warmup-steps`` untimed ones in the first round (compilation happens there).
The figure per round is rank 0's median step time. The speedup is the
baseline's time over the case's, one per round, and their median; above 1
means the change helps.

    python bench/fast_step.py --rounds 5 --steps 30
    python bench/fast_step.py --cases baseline,compile --warmup-steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_helpers import run_distributed  # noqa: E402
from s3_server import MotoServer  # noqa: E402
from service.config import Config, load_config  # noqa: E402
from service.prepare import prepare_dataset  # noqa: E402
from workers.data import BatchPrefetcher, SampleOrder, TokenDataset, rank_micro_batches  # noqa: E402
from workers.model import build_model  # noqa: E402
from workers.parallel import build_device_mesh, parallelize  # noqa: E402
from workers.step import apply_update, compute_gradients  # noqa: E402
from workers.train_loop import build_optimizer, model_args  # noqa: E402

WORLD_SIZE = 2
CASES = {
    "baseline": {},
    "no_pre_forward_sync": {"pre_forward_sync": False},
    "fused_adamw": {"implementation": "fused"},
    "prefetch": {"prefetch": True},
    "compile": {"compile": True},
    "baseline_s3": {"s3": True},
    "prefetch_s3": {"s3": True, "prefetch": True},
}
BASELINES = {"baseline_s3": "baseline_s3", "prefetch_s3": "baseline_s3"}


@dataclass
class CaseSettings:
    pre_forward_sync: bool = True
    implementation: str = "foreach"
    prefetch: bool = False
    compile: bool = False
    s3: bool = False


class Case:
    """One case's model, optimizer and data, kept across rounds."""

    def __init__(self, config: Config, settings: CaseSettings, dataset_uri: str, storage_options: dict[str, Any]):
        self.config = config.model_copy(update={
            "optim": config.optim.model_copy(update={"implementation": settings.implementation}),
        })
        self.settings = settings
        mesh = build_device_mesh("cpu", WORLD_SIZE, config.parallel)
        model = build_model(model_args(config), seed=config.run.seed)
        self.parallel = parallelize(model, config.parallel, mesh, compile_blocks=settings.compile)
        self.optimizer = build_optimizer(self.parallel.module, self.config, self.parallel, "cpu")
        dataset = TokenDataset(dataset_uri, config.model.seq_len, storage_options)
        self.order = SampleOrder(dataset.num_samples, config.run.seed)
        self.prefetcher = BatchPrefetcher(dataset, enabled=settings.prefetch)
        self.step = 0

    def chunks(self, step: int) -> list[list[int]]:
        indices = self.order.global_batch(step, self.config.train.global_batch)
        return rank_micro_batches(indices, self.parallel.dp_rank, self.parallel.dp_size, self.config.train.micro_batch)

    def run_step(self) -> float:
        """Train one step and return its wall time in seconds."""
        self.step += 1
        started = time.perf_counter()
        batches = self.prefetcher.load(self.chunks(self.step))
        self.prefetcher.prefetch(self.chunks(self.step + 1))
        if self.settings.pre_forward_sync:
            count = torch.tensor([float(sum(batch.num_target_tokens for batch in batches))], dtype=torch.float64)
            dist.all_reduce(count)
            count.tolist()
        gradients = compute_gradients(self.parallel.module, batches, device=torch.device("cpu"),
                                      fsdp_units=self.parallel.sync_units)
        apply_update(self.parallel.module, self.optimizer, gradients, lr=self.config.optim.lr,
                     grad_clip=self.config.train.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def _bench_rank(rank: int, world_size: int, config_data: dict[str, Any], dataset_uris: dict[str, str],
                storage_options: dict[str, Any], case_names: list[str], rounds: int, steps: int, warmup_steps: int,
                output: str) -> None:
    torch.set_num_threads(1)
    config = Config.model_validate(config_data)
    cases: dict[str, Case] = {}
    for name in case_names:
        settings = CaseSettings(**CASES[name])
        uri = dataset_uris["s3" if settings.s3 else "local"]
        cases[name] = Case(config, settings, uri, storage_options if settings.s3 else {})
        for _ in range(warmup_steps):
            cases[name].run_step()
    medians: dict[str, list[float]] = {name: [] for name in case_names}
    for _ in range(rounds):
        for name, case in cases.items():
            dist.barrier()
            medians[name].append(statistics.median(case.run_step() for _ in range(steps)))
    if rank == 0:
        Path(output).write_text(json.dumps(medians))


def summarize(medians: dict[str, list[float]]) -> dict[str, Any]:
    """Per case: median step time per round (ms) and baseline / case per round, with the median ratio."""
    result: dict[str, Any] = {}
    for name, times in medians.items():
        baseline = medians.get(BASELINES.get(name, "baseline"))
        entry: dict[str, Any] = {"median_step_ms": [round(1000 * value, 2) for value in times]}
        if baseline is not None:
            ratios = [base / value for base, value in zip(baseline, times, strict=True)]
            entry["speedup_per_round"] = [round(ratio, 3) for ratio in ratios]
            entry["speedup_median"] = round(statistics.median(ratios), 3)
        result[name] = entry
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default=str(ROOT / "examples" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.dim=256 (repeatable)")
    parser.add_argument("--cases", default="baseline,no_pre_forward_sync,fused_adamw,prefetch,compile",
                        help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--s3", action="store_true", help="add the baseline_s3 and prefetch_s3 cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case per round")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per case before the first round")
    parser.add_argument("--timeout-s", type=float, default=3000.0, help="limit for the whole benchmark, in seconds")
    args = parser.parse_args()

    case_names = [name.strip() for name in args.cases.split(",") if name.strip()]
    if args.s3:
        case_names += [name for name in ("baseline_s3", "prefetch_s3") if name not in case_names]
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; use some of {', '.join(CASES)}")
    if "baseline" not in case_names and any(name not in BASELINES for name in case_names):
        case_names.insert(0, "baseline")

    config = load_config(args.config, [*args.overrides, f"scaling.num_workers={WORLD_SIZE}"])
    with tempfile.TemporaryDirectory(prefix="stalwart-fast-step-") as folder:
        dataset_uris = {"local": prepare_dataset(config.data, str(Path(folder) / "storage"), {})}
        server = None
        storage_options: dict[str, Any] = {}
        if args.s3:
            # moto accepts any credentials; these fake ones keep real ones out of the benchmark.
            os.environ.update(AWS_ACCESS_KEY_ID="bench-key-id", AWS_SECRET_ACCESS_KEY="bench-secret",
                              AWS_EC2_METADATA_DISABLED="true")
            server = MotoServer(Path(folder) / "moto.log")
            server.start()
        try:
            if server is not None:
                storage_options = server.storage_options()
                bucket = server.create_bucket()
                dataset_uris["s3"] = prepare_dataset(config.data, f"s3://{bucket}/storage", storage_options)
            output = str(Path(folder) / "result.json")
            run_distributed(_bench_rank, WORLD_SIZE, config.model_dump(mode="json"), dataset_uris, storage_options,
                            case_names, args.rounds, args.steps, args.warmup_steps, output, timeout_s=args.timeout_s)
            medians = json.loads(Path(output).read_text())
        finally:
            if server is not None:
                server.stop()
    load = os.getloadavg()[0]
    print(json.dumps({"world_size": WORLD_SIZE, "rounds": args.rounds, "steps": args.steps,
                      "load_average_1m": round(load, 2), "cases": summarize(medians)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
