"""Throughput, MFU and peak memory of a ~1B-parameter Llama-style model on one GPU.

Trains workers/model.py with the FSDP2 wrapping of workers/parallel.py
(world size 1, bf16 parameters, fp32 gradient reduction) and the step of
workers/step.py on random token ids generated here, so nothing is downloaded
and no Ray cluster is involved. Prints one line per step and a JSON summary:

    python bench/gpu_check.py                 # ~1.1B parameters, 30 steps
    python bench/gpu_check.py --compile       # the same with torch.compile per block
    python bench/gpu_check.py --device cpu --model tiny --steps 4   # smoke test of this script

MFU uses the dense bf16 peak of workers/flops.py for the GPU's name, or
``--peak-tflops``. Without a GPU (and without ``--device cpu``) it prints
why and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Set before Ray is imported (through workers.train_loop); no Ray cluster is started.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from service.config import Config, config_from_dict  # noqa: E402
from workers.data import MicroBatch  # noqa: E402
from workers.flops import current_device_peak, mfu, training_flops_per_token  # noqa: E402
from workers.model import build_model, count_parameters  # noqa: E402
from workers.parallel import apply_fsdp, compile_each_block  # noqa: E402
from workers.step import train_step  # noqa: E402
from workers.train_loop import build_optimizer, model_args  # noqa: E402

# Shapes close to Llama 3.2 1B with a 32k vocabulary, untied: about 1.1e9 parameters.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "1b": {"n_layers": 16, "dim": 2048, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192,
           "vocab_size": 32000, "seq_len": 2048, "rope_theta": 500000.0},
    "tiny": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 264, "seq_len": 64},
}

NO_GPU_MESSAGE = (
    "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False; torch {version}, CUDA build {cuda}). "
    "Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu --model tiny "
    "for a smoke test of the script."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="1b", help="model shape (default 1b)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="first steps left out of tokens/s and MFU; raise it with --compile (default 5)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device (default cuda)")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense bf16 peak of the device in TFLOP/s, for a device not in workers/flops.py")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random tokens")
    args = parser.parse_args(argv)
    if args.steps < args.warmup_steps + 2:
        parser.error(f"--steps={args.steps} leaves fewer than 2 steps after --warmup-steps={args.warmup_steps}")
    return args


def build_config(args: argparse.Namespace) -> Config:
    model = dict(MODEL_PRESETS[args.model])
    if args.seq_len is not None:
        model["seq_len"] = args.seq_len
    return config_from_dict({
        "run": {"seed": args.seed},
        "model": model,
        "train": {"steps": args.steps, "micro_batch": args.micro_batch,
                  "global_batch": args.micro_batch * args.grad_accum, "grad_clip": 1.0},
        # Lower than the tiny example's 3e-3, which is high for 1B parameters: a step skipped for a
        # non-finite loss does less work and would inflate tokens/s.
        "optim": {"lr": 3e-4},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "parallel": {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
        "scaling": {"num_workers": 1, "use_gpu": args.device == "cuda"},
    })


def random_micro_batches(config: Config, generator: torch.Generator) -> list[MicroBatch]:
    """Return one step's micro-batches of uniformly random token ids (on CPU, as the data loader gives them)."""
    batches = []
    for _ in range(config.grad_accum_steps):
        tokens = torch.randint(0, config.model.vocab_size, (config.train.micro_batch, config.model.seq_len + 1),
                               generator=generator)
        batches.append(MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=()))
    return batches


def resolve_peak(args: argparse.Namespace, device: torch.device) -> tuple[str, float | None, str]:
    """Return (device name, peak FLOP/s or None, where the peak came from)."""
    name, entry = current_device_peak(device.index or 0) if device.type == "cuda" else ("cpu", None)
    if args.peak_tflops is not None:
        return name, args.peak_tflops * 1e12, "--peak-tflops"
    if entry is None:
        return name, None, "no known peak for this device; pass --peak-tflops"
    return name, entry.flops, entry.source


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE.format(version=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # A one-rank process group over a file store: FSDP2 needs a group, and no port is opened.
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            summary = run(args, build_config(args), device)
        finally:
            dist.destroy_process_group()
    print(json.dumps({"summary": summary}))
    return 0


@dataclass
class Training:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fsdp_units: list[FSDPModule]
    num_parameters: int


def build_training(args: argparse.Namespace, config: Config, device: torch.device) -> Training:
    """Build the model on ``device``, optionally compile its blocks, shard it with FSDP2 and build AdamW."""
    model = build_model(model_args(config), seed=config.run.seed)
    num_parameters = count_parameters(model)
    model.to(device)
    if args.compile:
        # NOTE: this path has run only on CPU with the tiny model so far, not on a GPU.
        compile_each_block(model)
    mesh = init_device_mesh(device.type, (1,))
    fsdp_units = apply_fsdp(model, mesh, param_dtype=config.parallel.param_dtype,
                            reduce_dtype=config.parallel.reduce_dtype)
    return Training(model, build_optimizer(model, config, device_type=device.type), fsdp_units, num_parameters)


def train_and_time(args: argparse.Namespace, config: Config, training: Training,
                   device: torch.device) -> tuple[float, int, int]:
    """Train ``train.steps`` steps; return (tokens/s after the warmup steps, tokens per step, skipped steps)."""
    generator = torch.Generator().manual_seed(config.run.seed)
    tokens = 0
    skipped = 0
    window_started = time.perf_counter()
    for step in range(1, config.train.steps + 1):
        if step == args.warmup_steps + 1:
            synchronize(device)
            window_started = time.perf_counter()
        step_started = time.perf_counter()
        result = train_step(training.model, training.optimizer, random_micro_batches(config, generator),
                            lr=config.optim.lr, grad_clip=config.train.grad_clip, device=device,
                            fsdp_units=training.fsdp_units)
        # train_step reads the loss back to the host before the optimizer step, so on a GPU this
        # time can leave out part of that step. The tokens/s window synchronizes at both ends.
        step_s = time.perf_counter() - step_started
        tokens = result.target_tokens
        skipped += int(result.skipped)
        print(f"step {step:3d} loss {result.loss:.4f} {step_s * 1e3:8.1f} ms {tokens / step_s:,.0f} tokens/s", flush=True)
    synchronize(device)
    measured_steps = config.train.steps - args.warmup_steps
    return tokens * measured_steps / (time.perf_counter() - window_started), tokens, skipped


def run(args: argparse.Namespace, config: Config, device: torch.device) -> dict[str, Any]:
    training = build_training(args, config, device)
    flops_per_token = training_flops_per_token(model_args(config))
    device_name, peak_flops, peak_source = resolve_peak(args, device)
    peak_text = "n/a" if peak_flops is None else f"{peak_flops / 1e12:.4g} TFLOP/s"
    print(f"{device_name}: {training.num_parameters:,} parameters, {flops_per_token:.4g} training FLOPs per token, "
          f"peak {peak_text} ({peak_source})", flush=True)

    tokens_per_second, tokens, skipped = train_and_time(args, config, training, device)

    utilization = mfu(tokens_per_second, flops_per_token, peak_flops, 1)
    peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(f"tokens/s {tokens_per_second:,.0f}; MFU {'n/a' if utilization is None else f'{utilization:.1%}'}; "
          f"peak memory allocated {'n/a' if peak_memory_gib is None else f'{peak_memory_gib:.1f} GiB'}; "
          f"skipped steps {skipped}")
    return {
        "device": device_name, "model": args.model, "parameters": training.num_parameters, "compile": args.compile,
        "micro_batch": config.train.micro_batch, "grad_accum": config.grad_accum_steps, "seq_len": config.model.seq_len,
        "steps": config.train.steps, "warmup_steps": args.warmup_steps, "tokens_per_step": tokens,
        "tokens_per_second": tokens_per_second, "training_flops_per_token": flops_per_token,
        "peak_flops": peak_flops, "peak_source": peak_source, "mfu": utilization,
        "max_memory_allocated_gib": peak_memory_gib, "skipped_steps": skipped, "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
