"""Parallelism strategies: DDP, ZeRO-1/2/3 (FSDP2), HSDP, tensor and sequence parallelism, activation checkpointing.

Every strategy keeps the same invariants, so the train step and the
checkpoints do not depend on the choice:

- gradients are summed over data-parallel ranks, never averaged, because the
  train step already divides the loss by the number of target tokens in the
  whole global batch;
- parameter names (FQNs) are the model's own, and model and optimizer state
  reach ``torch.distributed.checkpoint`` through ``get_state_dict``, so a
  checkpoint saved under one strategy loads under another;
- parameters stay float32 on every rank; ``param_dtype`` is the compute dtype
  (FSDP2's ``MixedPrecisionPolicy``, or ``torch.autocast`` under DDP).

What each strategy keeps on a rank (P parameters, N data-parallel ranks):

========  =================  ===================  ===========================
strategy  parameters         gradients            AdamW moments
========  =================  ===================  ===========================
ddp       P                  P (DDP buckets)      2P
zero1     P                  P (DDP buckets)      2P / N (``ShardedAdamW``)
zero2     P / N, plus every  P / N                2P / N
          unit unsharded
          from forward to
          its backward
zero3     P / N, one unit    P / N                2P / N
          unsharded at a
          time
hsdp      P / S (S ranks per shard group), the rest as zero3
========  =================  ===================  ===========================

``fsdp`` is another name for ``zero3`` and runs the same code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel
from torch.optim.adam import adam

from workers.model import Transformer

if TYPE_CHECKING:
    from service.config import ParallelSection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FSDP_STRATEGIES = ("zero2", "zero3", "fsdp", "hsdp")
DDP_STRATEGIES = ("ddp", "zero1")


class GradientSyncUnit(Protocol):
    """Something whose gradient reduction the train step turns off for all but the last micro-batch."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None: ...


@dataclass
class ParallelModel:
    """A model prepared for one strategy, with what the train step and the optimizer need to know."""

    module: nn.Module  # what the train step calls and the checkpoint reads (a DDP wrapper under ddp and zero1)
    sync_units: list[GradientSyncUnit]
    mesh: DeviceMesh
    dp_rank: int  # index of this rank's data shard
    dp_size: int  # ranks that see different data
    tp_size: int  # ranks that share each sample (tensor parallelism)
    shard_optimizer_state: bool  # zero1: build ShardedAdamW instead of AdamW


# Device mesh.


def build_device_mesh(device_type: str, world_size: int, settings: ParallelSection) -> DeviceMesh:
    """Return the strategy's mesh: 1-D ("dp",), 2-D ("replicate", "shard") for HSDP, or 2-D ("dp", "tp")."""
    if settings.strategy == "hsdp":
        shard_size = settings.hsdp_shard_size
        if shard_size is None or world_size % shard_size:
            raise ValueError(f"parallel.hsdp_shard_size={shard_size} does not divide the world size {world_size}; "
                             "choose a divisor of scaling.num_workers")
        return init_device_mesh(device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    tp_size = settings.tensor_parallel_size
    if tp_size > 1:
        if world_size % tp_size:
            raise ValueError(f"parallel.tensor_parallel_size={tp_size} does not divide the world size {world_size}; "
                             "choose a divisor of scaling.num_workers")
        return init_device_mesh(device_type, (world_size // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def data_parallel_coordinates(mesh: DeviceMesh) -> tuple[int, int]:
    """Return (dp_rank, dp_size): which data shard this rank trains on, and how many shards there are."""
    if mesh.mesh_dim_names == ("dp", "tp"):
        return mesh.get_local_rank("dp"), mesh.size(0)
    # HSDP and 1-D meshes: every rank trains on its own data shard, ordered by global rank.
    return dist.get_rank(), dist.get_world_size()


# Strategies.


def parallelize(model: Transformer, settings: ParallelSection, mesh: DeviceMesh, *,
                compile_blocks: bool = False) -> ParallelModel:
    """Apply tensor parallelism, activation checkpointing, compilation and the data-parallel strategy in place.

    ``model`` must be on its device with identical weights on every rank.
    """
    tp_size = settings.tensor_parallel_size
    if tp_size > 1:
        apply_tensor_parallel(model, mesh["tp"])
    apply_activation_checkpointing(model, settings.activation_checkpointing, settings.checkpoint_every)
    if compile_blocks:
        compile_each_block(model)

    dp_rank, dp_size = data_parallel_coordinates(mesh)
    strategy = settings.strategy
    if strategy in DDP_STRATEGIES:
        autocast_dtype = None if settings.param_dtype == "float32" else DTYPES[settings.param_dtype]
        wrapped = SumDataParallel(model, process_group=mesh.get_group(), autocast_dtype=autocast_dtype)
        return ParallelModel(module=wrapped, sync_units=[DDPGradientSync(wrapped)], mesh=mesh, dp_rank=dp_rank,
                             dp_size=dp_size, tp_size=1, shard_optimizer_state=strategy == "zero1")

    # zero2 keeps every unit unsharded from its forward to its backward; zero3/fsdp/hsdp reshard after forward.
    dp_mesh = mesh["dp"] if tp_size > 1 else mesh
    units = apply_fsdp(model, dp_mesh, param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype,
                       reshard_after_forward=strategy != "zero2", cpu_offload=settings.cpu_offload)
    return ParallelModel(module=model, sync_units=list(units), mesh=mesh, dp_rank=dp_rank, dp_size=dp_size,
                         tp_size=tp_size, shard_optimizer_state=False)


def compile_each_block(model: Transformer) -> None:
    """torch.compile every transformer block in place, one region per block, before sharding.

    ``Module.compile`` keeps parameter names unchanged, unlike wrapping a block in
    ``torch.compile(block)``, so checkpoints stay interchangeable with eager runs.
    FSDP2's all-gathers and reduce-scatters then run between the compiled regions.
    """
    for block in model.layers:
        block.compile()


def apply_fsdp(model: Transformer, mesh: DeviceMesh, *, param_dtype: str, reduce_dtype: str,
               reshard_after_forward: bool = True, cpu_offload: bool = False) -> list[FSDPModule]:
    """Shard ``model`` in place, one unit per transformer block plus the root, and return the units, root last.

    A 1-D mesh shards fully; a 2-D ("replicate", "shard") mesh gives HSDP. Gradients are summed over
    ranks, not averaged: the train step already divides the loss by the number of target tokens in the
    whole global batch.
    """
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    units: list[FSDPModule] = []
    for block in model.layers:
        units.append(fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload,
                                 reshard_after_forward=reshard_after_forward))
    units.append(fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload,
                             reshard_after_forward=reshard_after_forward))
    for unit in units:
        # Plain SUM (no divide, no PREMUL_SUM): gloo supports only the plain ops.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return units


def _sum_all_reduce_hook(group, bucket):
    # DDP's default hook divides by the world size; Stalwart's gradients are sums.
    # No annotations: DDP compares them with dist.GradBucket, and postponed annotations are strings.
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class SumDataParallel(DistributedDataParallel):
    """DDP whose gradients are sums over ranks, with an optional ``torch.autocast`` compute dtype.

    Parameters, gradients and the optimizer stay float32; under autocast the
    matrix multiplications run in ``autocast_dtype``. Gradients live in DDP's
    buckets (``gradient_as_bucket_view``), so they cost no memory beyond the buckets.
    """

    def __init__(self, module: nn.Module, *, process_group: dist.ProcessGroup, autocast_dtype: torch.dtype | None):
        # Buffers (the RoPE tables) are a function of the config, identical on every rank: no sync per forward.
        super().__init__(module, process_group=process_group, gradient_as_bucket_view=True, forward_sync_buffers=False)
        self.register_comm_hook(process_group, _sum_all_reduce_hook)
        self.autocast_dtype = autocast_dtype
        self.autocast_device_type = next(module.parameters()).device.type

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.autocast_dtype is None:
            return super().forward(*inputs, **kwargs)
        with torch.autocast(self.autocast_device_type, dtype=self.autocast_dtype):
            return super().forward(*inputs, **kwargs)


class DDPGradientSync:
    """The train step's gradient-sync switch for a DDP module (what ``DistributedDataParallel.no_sync`` sets)."""

    def __init__(self, module: DistributedDataParallel):
        self.module = module

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        self.module.require_backward_grad_sync = requires_gradient_sync


# ZeRO-1: replicated parameters and gradients, sharded optimizer state.


def _row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return this rank's [start, stop) rows: ``torch.chunk`` on dim 0, which is DTensor's ``Shard(0)`` layout."""
    chunk = math.ceil(rows / world_size)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class ShardedAdamW(torch.optim.Optimizer):
    """AdamW for replicated parameters that keeps each moment only for this rank's rows (ZeRO stage 1).

    Each rank updates its ``Shard(0)`` rows of every parameter with the full
    (all-reduced) gradient and then all-gathers the updated rows. The moments
    are DTensors with the same ``Shard(0)`` layout FSDP2 gives optimizer
    state, so checkpoints move between this optimizer and the FSDP strategies.
    The update is ``torch.optim.adam.adam`` with decoupled weight decay, the
    function ``torch.optim.AdamW`` runs.
    """

    def __init__(self, params: Iterable[Any], *, mesh: DeviceMesh, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float):
        if mesh.ndim != 1:
            raise ValueError(f"ShardedAdamW needs a 1-D data-parallel mesh, got {mesh.ndim} dimensions")
        # The same param-group keys as torch.optim.AdamW (amsgrad, foreach, ...): DCP loads a checkpoint
        # only when it has every key of the optimizer it loads into, in both directions.
        defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay, foreach=True).defaults
        super().__init__(params, defaults)
        self.mesh = mesh
        self.process_group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world_size = mesh.size()
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim == 0:
                    raise ValueError("ShardedAdamW shards dim 0 and cannot hold 0-d parameters")

    def local_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a view of this rank's rows of ``tensor``."""
        start, stop = _row_range(tensor.shape[0], self.rank, self.world_size)
        return tensor.detach()[start:stop]

    def _new_moment(self, param: torch.Tensor) -> DTensor:
        local = torch.zeros_like(self.local_rows(param), memory_format=torch.contiguous_format)
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=param.shape,
                                  stride=param.stride())

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = self._new_moment(param)
                    state["exp_avg_sq"] = self._new_moment(param)
                params.append(self.local_rows(param))
                grads.append(self.local_rows(param.grad))
                exp_avgs.append(state["exp_avg"].to_local())
                exp_avg_sqs.append(state["exp_avg_sq"].to_local())
                steps.append(state["step"])
            if params:
                beta1, beta2 = group["betas"]
                adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, decoupled_weight_decay=True,
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                     eps=group["eps"], maximize=False)
        self.gather_parameters()
        return loss

    def gather_parameters(self) -> None:
        """Give every rank the updated rows of every other rank: one all-gather per parameter.

        A parameter whose rows split evenly is gathered straight into its own storage, because
        rank r's rows are the r-th contiguous chunk of it. Others go through a buffer padded to
        equal chunks, so the transient memory is at most one parameter.
        """
        for group in self.param_groups:
            for param in group["params"]:
                param = param.detach()
                rows = param.shape[0]
                chunk_rows = math.ceil(rows / self.world_size)
                send = param.new_zeros((chunk_rows, *param.shape[1:]))
                local = self.local_rows(param)
                send[: local.shape[0]].copy_(local)
                if rows % self.world_size == 0:
                    dist.all_gather_into_tensor(param, send, group=self.process_group)
                    continue
                received = param.new_empty((chunk_rows * self.world_size, *param.shape[1:]))
                dist.all_gather_into_tensor(received, send, group=self.process_group)
                for rank in range(self.world_size):
                    start, stop = _row_range(rows, rank, self.world_size)
                    param[start:stop].copy_(received[rank * chunk_rows : rank * chunk_rows + stop - start])


# Tensor and sequence parallelism.


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard attention and MLP projections over ``tp_mesh`` (Megatron layout) with sequence parallelism.

    Column-wise: wq, wk, wv, w1, w3 and the output head; row-wise: wo, w2 and the
    embedding. Between blocks and in the RMSNorms, activations are split along
    the sequence (``Shard(1)``). The logits come back whole on every rank of
    the group, so the loss is computed as without tensor parallelism.
    """
    tp_size = tp_mesh.size()
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True),
    })
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan)
        # The projections now produce this rank's heads only, and Attention reshapes by these counts.
        block.attention.n_heads //= tp_size
        block.attention.kv_heads //= tp_size


# Activation checkpointing.


def checkpointed_blocks(n_layers: int, mode: str, every: int) -> list[int]:
    """Return the indices of the blocks whose activations are recomputed in backward."""
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return list(range(0, n_layers, every))
    return []


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> None:
    """Recompute the chosen blocks' activations in backward; only each block's input is kept.

    Uses the composable ``checkpoint``, which keeps parameter names unchanged.
    """
    for index in checkpointed_blocks(len(model.layers), mode, every):
        checkpoint_activations(model.layers[index])
