"""Memory planner: per-rank memory of each parallelism strategy, and the fastest strategy that fits.

The estimate counts the bytes of what each strategy really keeps on a rank
(workers/parallel.py), each in its dtype, sharded or not:

- parameters: float32 master weights, the only copy. Model state is 16 bytes
  per parameter in all, as in the ZeRO paper (Rajbhandari et al., 2020): 4 for
  the master weight, 4 for the float32 gradient, 8 for the AdamW moments.
  ZeRO's 2-byte low-precision weight and gradient appear here as the transient
  unsharded copies;
- gradients: float32, sharded like the parameters under FSDP, whole in DDP's
  buckets under ddp and zero1;
- optimizer state: AdamW's two float32 moments per parameter;
- activations: what autograd saves in forward, per block and for the output
  head (``block_activation_bytes``, ``head_activation_bytes``);
- in-flight copies: FSDP's unsharded units (the all-gather buffers) and their
  unsharded gradients, or autocast's low-precision weight copies under DDP;
- transients: the loss's backward and the optimizer step's temporaries.

The peak is the larger of two moments: the start of the last block's backward
(all activations saved, the output head's backward just done) and the
optimizer step. Everything here is an estimate; bench/memory_check.py
measures the real peaks and docs/benchmarks.md records the error.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MASTER_BYTES = 4  # float32 parameters, gradients and moments
INDEX_BYTES = 8  # int64 token ids
# Fastest first, by the bytes each moves per step in units of the model size. DDP and zero2 move 2
# (an all-reduce, or a reduce-scatter plus an all-gather). zero1 here moves 3, because DDP's
# all-reduce is followed by an all-gather of the updated rows. hsdp moves 3 inside a shard group
# but only 2 / shard size across groups, and zero3 moves 3 across all ranks. Recomputation adds
# about one forward per recomputed block.
SPEED_ORDER = ("ddp", "zero2", "zero1", "hsdp", "zero3")
CHECKPOINTING_ORDER = ("none", "selective", "full")
GIB = 2**30


@dataclass(frozen=True)
class PlanInputs:
    """Model shape, batch and parallel settings of one run, as the planner needs them."""

    n_layers: int
    dim: int
    n_heads: int
    vocab_size: int
    seq_len: int
    micro_batch: int
    world_size: int
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    tie_embeddings: bool = False
    grad_accum_steps: int = 1
    strategy: str = "fsdp"
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    activation_checkpointing: str = "none"
    checkpoint_every: int = 2
    cpu_offload: bool = False
    hsdp_shard_size: int | None = None
    tensor_parallel_size: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return (self.n_kv_heads or self.n_heads) * self.head_dim

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: given, or 8/3 x dim rounded up to a multiple of 64 (workers/model.py's rule)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * math.ceil(int(8 * self.dim / 3) / 64)

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch of one rank."""
        return self.micro_batch * self.seq_len

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def shard_size(self) -> int:
        """Ranks that split each parameter and its optimizer state."""
        if self.strategy == "hsdp":
            return self.hsdp_shard_size or 1
        if self.strategy in ("zero2", "zero3", "fsdp"):
            return self.world_size // self.tensor_parallel_size
        if self.strategy == "zero1":
            return self.world_size
        return 1


def plan_inputs_from_config(config: Config, world_size: int | None = None) -> PlanInputs:
    """Return the planner inputs of ``config`` at ``world_size`` (default: the largest world size)."""
    world_size = world_size or config.scaling.max_workers
    model, parallel = config.model, config.parallel
    dp_size = world_size // parallel.tensor_parallel_size
    return PlanInputs(
        n_layers=model.n_layers, dim=model.dim, n_heads=model.n_heads, n_kv_heads=model.n_kv_heads,
        vocab_size=model.vocab_size, seq_len=model.seq_len, ffn_hidden=model.ffn_hidden,
        tie_embeddings=model.tie_embeddings, micro_batch=config.train.micro_batch, world_size=world_size,
        grad_accum_steps=max(1, config.train.global_batch // (config.train.micro_batch * dp_size)),
        strategy=parallel.strategy, param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype,
        activation_checkpointing=parallel.activation_checkpointing, checkpoint_every=parallel.checkpoint_every,
        cpu_offload=parallel.cpu_offload, hsdp_shard_size=parallel.hsdp_shard_size,
        tensor_parallel_size=parallel.tensor_parallel_size,
    )


# Parameters.


@dataclass(frozen=True)
class ParamShape:
    rows: int  # dim 0, the dimension FSDP and ShardedAdamW split
    columns: int
    tp_dim: int | None  # dimension tensor parallelism splits: 0 (column-wise), 1 (row-wise), None (replicated)

    def local(self, tp_size: int) -> tuple[int, int]:
        """Return (rows, columns) on one rank of a tensor-parallel group."""
        if self.tp_dim == 0:
            return self.rows // tp_size, self.columns
        if self.tp_dim == 1:
            return self.rows, self.columns // tp_size
        return self.rows, self.columns

    def numel(self) -> int:
        return self.rows * self.columns


def block_shapes(inputs: PlanInputs) -> list[ParamShape]:
    """Return the parameters of one transformer block (workers/model.py's Block)."""
    dim, kv_dim, hidden = inputs.dim, inputs.kv_dim, inputs.hidden_dim
    return [
        ParamShape(dim, 1, None),  # attention_norm
        ParamShape(dim, dim, 0),  # wq
        ParamShape(kv_dim, dim, 0),  # wk
        ParamShape(kv_dim, dim, 0),  # wv
        ParamShape(dim, dim, 1),  # wo
        ParamShape(dim, 1, None),  # ffn_norm
        ParamShape(hidden, dim, 0),  # w1
        ParamShape(hidden, dim, 0),  # w3
        ParamShape(dim, hidden, 1),  # w2
    ]


def root_shapes(inputs: PlanInputs) -> list[ParamShape]:
    """Return the parameters outside the blocks: embedding, final norm and (unless tied) the output head."""
    shapes = [ParamShape(inputs.vocab_size, inputs.dim, 0), ParamShape(inputs.dim, 1, None)]
    if not inputs.tie_embeddings:
        shapes.append(ParamShape(inputs.vocab_size, inputs.dim, 0))
    return shapes


def parameter_count(inputs: PlanInputs) -> int:
    return inputs.n_layers * sum(shape.numel() for shape in block_shapes(inputs)) + sum(
        shape.numel() for shape in root_shapes(inputs))


def _local_numel(shapes: list[ParamShape], inputs: PlanInputs, shard_size: int) -> int:
    """Elements one rank keeps of ``shapes``: rank 0's chunk, ceil(rows / shard_size) rows, the largest."""
    total = 0
    for shape in shapes:
        rows, columns = shape.local(inputs.tensor_parallel_size)
        total += math.ceil(rows / shard_size) * columns
    return total


def _unsharded_numel(shapes: list[ParamShape], inputs: PlanInputs, shard_size: int) -> int:
    """Elements of one FSDP unit after the all-gather: each parameter padded to a multiple of the shard size."""
    return shard_size * _local_numel(shapes, inputs, shard_size)


# Activations.


def block_activation_bytes(inputs: PlanInputs) -> int:
    """Return the bytes autograd saves in one block's forward for one micro-batch (no recomputation).

    Per token, in compute-dtype elements: 4 x hidden for SwiGLU (the w1 and w3
    outputs, the SiLU output and their product) and 5 x dim + 2 x kv_dim for
    attention (query and key before and after RoPE, value, the attention output
    and the reshaped copy that wo reads). Per token, in float32: 4 x dim for the
    two RMSNorms, which keep float32 copies also under bfloat16, one attention
    log-sum-exp per head and one inverse RMS per norm.
    ``scaled_dot_product_attention`` runs a fused kernel that keeps no
    seq x seq score matrix, so the 5 x heads x seq term of Korthikanti et al.
    (2022) does not apply. tests/test_planner.py checks this count against the
    tensors autograd really saves.
    """
    tp = inputs.tensor_parallel_size
    tokens, dim, kv_dim, hidden = inputs.tokens, inputs.dim, inputs.kv_dim, inputs.hidden_dim
    if tp == 1:
        compute = 4 * hidden + 5 * dim + 2 * kv_dim
        return tokens * (inputs.compute_bytes * compute + MASTER_BYTES * (4 * dim + inputs.n_heads + 2))
    # Tensor and sequence parallelism: tensors split by heads or hidden units shrink by tp, and the
    # norms work on a tp-th of the sequence. The all-gathered inputs of wq/wk/wv and w1/w3 stay whole.
    compute = (4 * hidden + 3 * dim + 2 * kv_dim) / tp + 2 * dim
    return int(tokens * (inputs.compute_bytes * compute + MASTER_BYTES * (4 * dim / tp + inputs.n_heads / tp + 2 / tp)))


def head_activation_bytes(inputs: PlanInputs) -> int:
    """Return the bytes kept for the loss at the start of backward: token ids, final norm, logits, log-softmax."""
    tp = inputs.tensor_parallel_size
    tokens, vocab = inputs.tokens, inputs.vocab_size
    float32_logits = inputs.compute_bytes != MASTER_BYTES  # the loss upcasts low-precision logits
    logits_bytes = tokens * vocab * (inputs.compute_bytes + MASTER_BYTES + MASTER_BYTES * float32_logits)
    norm_bytes = tokens * MASTER_BYTES * (2 * inputs.dim + 1) // tp
    return tokens * INDEX_BYTES + norm_bytes + logits_bytes


def loss_backward_bytes(inputs: PlanInputs) -> int:
    """Return the transient gradients of the loss's backward: two float32 tensors of the logits' size."""
    return 2 * inputs.tokens * inputs.vocab_size * MASTER_BYTES


def activation_bytes(inputs: PlanInputs) -> int:
    """Return the activations saved for one micro-batch at the start of backward, recomputation included.

    A recomputed block keeps only its input. The last block's backward runs
    first and recomputes it whole, so that block's full activations count too.
    """
    per_block = block_activation_bytes(inputs)
    block_input = inputs.tokens * inputs.dim * inputs.compute_bytes // inputs.tensor_parallel_size
    recomputed = _recomputed_blocks(inputs)
    kept = (inputs.n_layers - len(recomputed)) * per_block + len(recomputed) * block_input
    if inputs.n_layers - 1 in recomputed:
        kept += per_block
    return kept + head_activation_bytes(inputs)


def _recomputed_blocks(inputs: PlanInputs) -> list[int]:
    if inputs.activation_checkpointing == "full":
        return list(range(inputs.n_layers))
    if inputs.activation_checkpointing == "selective":
        return list(range(0, inputs.n_layers, inputs.checkpoint_every))
    return []


# The estimate.


@dataclass
class MemoryEstimate:
    """Per-rank memory of one strategy, in bytes: ``peak_bytes`` on the device, offloaded state in ``host_bytes``."""

    inputs: PlanInputs
    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    gather_bytes: int  # in flight at the backward peak: unsharded FSDP units and their gradients, or autocast copies
    largest_unit_gather_bytes: int  # the all-gather output of the largest FSDP unit
    loss_backward_bytes: int
    optimizer_step_bytes: int  # temporaries of the optimizer step
    host_bytes: int  # CPU offload: parameters, gradients and optimizer state kept in host memory
    backward_peak_bytes: int
    step_peak_bytes: int
    unified_peak_bytes: int  # the peak where device and host memory are one (a CPU run): offloaded state counts too
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.backward_peak_bytes, self.step_peak_bytes)

    @property
    def peak_phase(self) -> str:
        return "backward" if self.backward_peak_bytes >= self.step_peak_bytes else "optimizer step"


def estimate_memory(inputs: PlanInputs) -> MemoryEstimate:
    """Estimate the peak memory of one rank under ``inputs.strategy`` (``fsdp`` is ``zero3``)."""
    strategy = "zero3" if inputs.strategy == "fsdp" else inputs.strategy
    if strategy in ("ddp", "zero1"):
        return _estimate_ddp(inputs, sharded_optimizer=strategy == "zero1")
    return _estimate_fsdp(inputs, keep_unsharded=strategy == "zero2")


def _estimate_ddp(inputs: PlanInputs, *, sharded_optimizer: bool) -> MemoryEstimate:
    blocks, roots = block_shapes(inputs), root_shapes(inputs)
    all_shapes = blocks * inputs.n_layers + roots
    params = parameter_count(inputs)
    parameters_bytes = MASTER_BYTES * params
    gradients_bytes = MASTER_BYTES * params  # DDP's buckets, allocated once and kept
    optimizer_shard = inputs.world_size if sharded_optimizer else 1
    moment_numel = _local_numel(all_shapes, inputs, optimizer_shard)
    optimizer_bytes = 2 * MASTER_BYTES * moment_numel

    # Autocast keeps a low-precision copy of every matrix it multiplies with until that matrix's
    # backward: the block projections and the output head, not the embedding or the norm weights.
    cast_numel = params - inputs.vocab_size * inputs.dim - (2 * inputs.n_layers + 1) * inputs.dim
    if inputs.tie_embeddings:
        cast_numel += inputs.vocab_size * inputs.dim
    gather_bytes = inputs.compute_bytes * cast_numel if inputs.param_dtype != "float32" else 0
    activations = activation_bytes(inputs)
    loss_backward = loss_backward_bytes(inputs)
    # AdamW's step allocates sqrt(second moment) once; ShardedAdamW then gathers one parameter at a time.
    # NOTE: that is the foreach kernels' temporary. The fused kernels (optim.implementation=auto on a
    # GPU) allocate none, so there the step peak is overstated by up to this much.
    step_bytes = MASTER_BYTES * moment_numel
    if sharded_optimizer:
        largest = max(shape.numel() for shape in all_shapes)
        step_bytes = max(step_bytes, MASTER_BYTES * largest * (1 + 1 / inputs.world_size))
    persistent = parameters_bytes + gradients_bytes + optimizer_bytes
    backward_peak = persistent + activations + gather_bytes + loss_backward
    step_peak = int(persistent + step_bytes)
    return MemoryEstimate(
        inputs=inputs, parameters_bytes=parameters_bytes, gradients_bytes=gradients_bytes,
        optimizer_bytes=optimizer_bytes, activations_bytes=activations, gather_bytes=gather_bytes,
        largest_unit_gather_bytes=0, loss_backward_bytes=loss_backward, optimizer_step_bytes=int(step_bytes),
        host_bytes=0, backward_peak_bytes=backward_peak, step_peak_bytes=step_peak,
        unified_peak_bytes=max(backward_peak, step_peak),
    )


def _estimate_fsdp(inputs: PlanInputs, *, keep_unsharded: bool) -> MemoryEstimate:
    shard = inputs.shard_size
    blocks, roots = block_shapes(inputs), root_shapes(inputs)
    local_numel = inputs.n_layers * _local_numel(blocks, inputs, shard) + _local_numel(roots, inputs, shard)
    block_unsharded = _unsharded_numel(blocks, inputs, shard)
    root_unsharded = _unsharded_numel(roots, inputs, shard)
    compute, reduce = inputs.compute_bytes, DTYPE_BYTES[inputs.reduce_dtype]

    parameters_bytes = MASTER_BYTES * local_numel
    gradients_bytes = MASTER_BYTES * local_numel
    optimizer_bytes = 2 * MASTER_BYTES * local_numel
    # In flight at the start of the last block's backward: the root unit, gathered again for the
    # output head, with the head's unsharded gradient. Then the last block and the block FSDP
    # prefetches, and the last block's unsharded gradients with the reduce-scatter input they are
    # copied into. zero2 has kept every unit unsharded since its forward.
    if keep_unsharded:
        in_flight_params = compute * (inputs.n_layers * block_unsharded + root_unsharded)
    else:
        in_flight_params = compute * (root_unsharded + min(2, inputs.n_layers) * block_unsharded)
    output_head = 0 if inputs.tie_embeddings else inputs.vocab_size * inputs.dim // inputs.tensor_parallel_size
    in_flight_grads = compute * (output_head + block_unsharded) + reduce * block_unsharded
    gather_bytes = in_flight_params + in_flight_grads
    notes = []
    if inputs.grad_accum_steps > 1:
        # Between micro-batches, with gradient sync off, FSDP2 keeps every unit's unsharded gradient.
        accumulated = (reduce if inputs.reduce_dtype != inputs.param_dtype else compute) * (
            inputs.n_layers * block_unsharded + root_unsharded)
        gather_bytes += accumulated
        notes.append(f"gradient accumulation ({inputs.grad_accum_steps} micro-batches) keeps "
                     f"{accumulated / GIB:.2f} GiB of unsharded gradients between micro-batches")

    activations = activation_bytes(inputs)
    loss_backward = loss_backward_bytes(inputs)
    step_bytes = MASTER_BYTES * local_numel
    persistent = parameters_bytes + optimizer_bytes
    backward_peak = persistent + activations + gather_bytes + loss_backward
    step_peak = persistent + gradients_bytes + step_bytes
    unified_peak = max(backward_peak, step_peak)
    host_bytes = 0
    if inputs.cpu_offload:
        host_bytes = persistent + gradients_bytes + step_bytes
        # The device keeps what is in flight, plus each unit's shard copied over before its all-gather.
        largest_shard = max(_local_numel(blocks, inputs, shard), _local_numel(roots, inputs, shard))
        backward_peak = activations + gather_bytes + loss_backward + compute * largest_shard
        step_peak = 0
        notes.append("CPU offload: the optimizer step runs on the host; the device holds only units in flight")
    return MemoryEstimate(
        inputs=inputs, parameters_bytes=parameters_bytes, gradients_bytes=gradients_bytes,
        optimizer_bytes=optimizer_bytes, activations_bytes=activations, gather_bytes=gather_bytes,
        largest_unit_gather_bytes=compute * max(block_unsharded, root_unsharded),
        loss_backward_bytes=loss_backward, optimizer_step_bytes=step_bytes, host_bytes=host_bytes,
        backward_peak_bytes=backward_peak, step_peak_bytes=step_peak, unified_peak_bytes=unified_peak, notes=notes,
    )


# Recommendation.


@dataclass(frozen=True)
class Recommendation:
    estimate: MemoryEstimate | None  # None when nothing fits
    candidates: list[MemoryEstimate]  # every option tried, fastest first


def candidate_settings(inputs: PlanInputs) -> list[PlanInputs]:
    """Return the options to try, fastest first: strategies by speed, then recomputation, then CPU offload.

    hsdp is tried only when ``inputs.hsdp_shard_size`` is set (for example to the GPUs per node).
    """
    options = []
    strategies = [name for name in SPEED_ORDER if name != "hsdp" or inputs.hsdp_shard_size]
    for checkpointing in CHECKPOINTING_ORDER:
        for strategy in strategies:
            options.append(replace(inputs, strategy=strategy, activation_checkpointing=checkpointing, cpu_offload=False,
                                   hsdp_shard_size=inputs.hsdp_shard_size if strategy == "hsdp" else None))
    for checkpointing in CHECKPOINTING_ORDER:
        options.append(replace(inputs, strategy="zero3", activation_checkpointing=checkpointing, cpu_offload=True,
                               hsdp_shard_size=None))
    if inputs.tensor_parallel_size > 1:
        # Tensor parallelism composes only with the FSDP strategies.
        options = [option for option in options if option.strategy in ("zero2", "zero3")]
    return options


def recommend(inputs: PlanInputs, device_memory_bytes: int) -> Recommendation:
    """Return the fastest option whose estimated peak fits in ``device_memory_bytes``."""
    candidates = [estimate_memory(option) for option in candidate_settings(inputs)]
    fitting = [estimate for estimate in candidates if estimate.peak_bytes <= device_memory_bytes]
    return Recommendation(estimate=fitting[0] if fitting else None, candidates=candidates)


# The lesson's example: a 7B Llama-style model, 4 sequences of 2048 tokens, 32 layers of width 4096, AdamW,
# bfloat16 compute. The lesson's own figure for it is 105.5 GB.
LESSON_7B = PlanInputs(n_layers=32, dim=4096, n_heads=32, vocab_size=32000, ffn_hidden=11008, seq_len=2048,
                       micro_batch=4, world_size=1, param_dtype="bfloat16", strategy="ddp")
LESSON_7B_GB = 105.5


def table_lines(estimates: list[MemoryEstimate]) -> list[str]:
    """Return a table of estimates in GiB, one row per estimate."""
    header = (f"{'strategy':<9} {'recompute':<9} {'offload':<7} {'params':>8} {'grads':>8} {'optim':>8} "
              f"{'activ.':>8} {'in flight':>9} {'host':>8} {'peak GiB':>9}  peak at")
    lines = [header]
    for estimate in estimates:
        inputs = estimate.inputs
        offloaded = estimate.host_bytes > 0
        device_state = [0, 0, 0] if offloaded else [estimate.parameters_bytes, estimate.gradients_bytes,
                                                     estimate.optimizer_bytes]
        values = [*device_state, estimate.activations_bytes, estimate.gather_bytes, estimate.host_bytes]
        cells = " ".join(f"{value / GIB:>8.2f}" for value in values[:4])
        lines.append(f"{inputs.strategy:<9} {inputs.activation_checkpointing:<9} {str(inputs.cpu_offload).lower():<7} "
                     f"{cells} {values[4] / GIB:>9.2f} {values[5] / GIB:>8.2f} {estimate.peak_bytes / GIB:>9.2f}  "
                     f"{estimate.peak_phase}")
        lines.extend(f"    note: {note}" for note in estimate.notes)
    return lines


def lesson_comparison_lines() -> list[str]:
    """Explain how the planner's figures for the lesson's 7B example relate to the lesson's 105.5 GB."""
    params = parameter_count(LESSON_7B)
    none = estimate_memory(LESSON_7B)
    full = estimate_memory(replace(LESSON_7B, activation_checkpointing="full"))
    implied = LESSON_7B_GB * 1e9 / 16
    return [
        f"lesson 7B example on one rank: {params / 1e9:.2f}e9 parameters (32 blocks of width 4096, SwiGLU width "
        "11008, 32000-token vocabulary, untied head)",
        f"  model state, 16 bytes per parameter: {16 * params / 1e9:.1f} GB ({16 * params / GIB:.1f} GiB); "
        f"the lesson's {LESSON_7B_GB} GB equals 16 bytes x {implied / 1e9:.2f}e9 parameters, so it likely counts model state only",
        f"  activations of 4 x 2048 tokens: {none.activations_bytes / 1e9:.1f} GB, or "
        f"{full.activations_bytes / 1e9:.1f} GB with full recomputation",
        f"  bfloat16 copies autocast keeps for backward: {none.gather_bytes / 1e9:.1f} GB; AdamW's step "
        f"temporary sqrt(exp_avg_sq): {none.optimizer_step_bytes / 1e9:.1f} GB",
        f"  planner peak: {none.peak_bytes / 1e9:.1f} GB ({none.peak_phase}), {full.peak_bytes / 1e9:.1f} GB with "
        f"full recomputation ({full.peak_phase}); docs/parallelism.md explains each difference",
    ]


def add_parser(commands: argparse._SubParsersAction, add_config_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    plan = commands.add_parser("plan", help="estimate per-rank memory of every parallelism strategy and recommend one")
    add_config_arguments(plan)
    plan.add_argument("--world-size", type=int, help="ranks to plan for (default: the largest of scaling.num_workers)")
    plan.add_argument("--device-memory-gib", type=float,
                      help="memory of one device in GiB; recommends the fastest option whose peak fits")
    plan.add_argument("--example", choices=("lesson-7b",),
                      help="plan the lesson's 7B example (4 x 2048 tokens, 32 layers, width 4096, AdamW) instead of the config")


def run_command(args: argparse.Namespace, config: Config | None) -> int:
    """Print the estimates of every strategy and, given a device size, the recommendation."""
    if args.example == "lesson-7b":
        inputs = replace(LESSON_7B, world_size=args.world_size or 1)
    else:
        assert config is not None
        inputs = plan_inputs_from_config(config, args.world_size)
    candidates = [estimate_memory(option) for option in candidate_settings(inputs)]
    print(f"per-rank memory estimate: {parameter_count(inputs):,} parameters, {inputs.world_size} ranks, "
          f"micro-batch {inputs.micro_batch} x {inputs.seq_len} tokens, compute dtype {inputs.param_dtype}")
    for line in table_lines(candidates):
        print(line)
    if args.example == "lesson-7b":
        for line in lesson_comparison_lines():
            print(line)
    if args.device_memory_gib is None:
        return 0
    choice = recommend(inputs, int(args.device_memory_gib * GIB)).estimate
    if choice is None:
        print(f"nothing fits in {args.device_memory_gib} GiB per device: add ranks, shorten model.seq_len or lower "
              "train.micro_batch")
        return 1
    chosen = choice.inputs
    print(f"recommended for {args.device_memory_gib} GiB: parallel.strategy={chosen.strategy} "
          f"parallel.activation_checkpointing={chosen.activation_checkpointing} "
          f"parallel.cpu_offload={str(chosen.cpu_offload).lower()} (peak {choice.peak_bytes / GIB:.2f} GiB)")
    return 0
