"""FSDP2 wrapping: one ``fully_shard`` unit per transformer block, plus the root."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from workers.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_fsdp(model: Transformer, mesh: DeviceMesh, *, param_dtype: str, reduce_dtype: str) -> list[FSDPModule]:
    """Shard ``model`` in place (full shard) and return its FSDP units, root last.

    Gradients are summed over ranks, not averaged: the train step already
    divides the loss by the number of target tokens in the whole global batch.
    """
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    units: list[FSDPModule] = []
    for block in model.layers:
        units.append(fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True))
    units.append(fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True))
    for unit in units:
        # Plain SUM (no divide, no PREMUL_SUM): gloo supports only the plain ops.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return units
