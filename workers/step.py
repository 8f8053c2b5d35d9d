"""One optimizer step, as named phases: forward/backward, clip, non-finite check, optimizer step.

The step minimizes the mean token cross-entropy over the whole global batch
(all micro-batches, all ranks). Gradients are summed over ranks, so splitting
a batch differently gives the same gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from workers.data import IGNORE_INDEX, MicroBatch


@dataclass
class StepResult:
    loss: float  # mean token loss over the global batch
    grad_norm: float  # global (unsharded) L2 norm before clipping
    target_tokens: int  # target tokens in the global batch
    skipped: bool  # True when a non-finite loss or grad norm skipped the optimizer step


@dataclass
class StepTotals:
    """The step's sums over ranks, still on the device: [loss sum, target tokens, *flags]."""

    totals: torch.Tensor
    capacity: int  # positions in the global batch; the backward pass divided the loss by this


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _set_gradient_sync(units: Sequence[FSDPModule], enabled: bool) -> None:
    for unit in units:
        unit.set_requires_gradient_sync(enabled)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    device: torch.device,
    fsdp_units: Sequence[FSDPModule] = (),
    *,
    loss_multiplier: float = 1.0,
    backward_scale: float = 1.0,
    flags: Sequence[float] = (),
    timings: dict[str, float] | None = None,
    sample_replicas: int = 1,
) -> StepTotals:
    """Accumulate gradients over this rank's micro-batches and sum the loss, tokens and flags over ranks.

    The backward pass needs the divisor of the loss before the global count of
    target tokens is known, so it divides by the batch's capacity (every
    position a target). ``Gradients.grad_factor`` turns those gradients into
    the gradients of the mean token loss. With no ignored targets the factor is
    exactly 1. The count then rides the same collective as the loss sum, after
    backward, so the step has no collective and no host sync before forward.

    ``loss_multiplier`` scales the loss itself (fault injection of a spike);
    ``backward_scale`` scales only what is backpropagated (float16 loss
    scaling), so the returned loss is unaffected by it. Gradient reduction
    across ranks runs only on the last micro-batch.

    ``flags`` are summed over ranks in that collective too; compute_gradients
    returns the sums in ``Gradients.flags``. When ``timings`` is given, the
    seconds this rank spent in the collective go to ``timings["sync_wait_s"]``.

    ``sample_replicas`` is the number of ranks that train on each sample (the
    tensor-parallel size): sums over all ranks count each token and its loss
    that many times, so they are divided by it.
    """
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # Every rank's micro-batches have the same shape, so the capacity is known without a collective.
    capacity = sum(batch.targets.numel() for batch in micro_batches) * world_size // sample_replicas
    local_tokens = sum(batch.num_target_tokens for batch in micro_batches)

    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for index, batch in enumerate(micro_batches):
        _set_gradient_sync(fsdp_units, index == len(micro_batches) - 1)
        inputs = batch.inputs.to(device, non_blocking=True)
        targets = batch.targets.to(device, non_blocking=True)
        logits = model(inputs)
        token_loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if loss_multiplier != 1.0:
            token_loss_sum = token_loss_sum * loss_multiplier
        (token_loss_sum * (backward_scale / capacity)).backward()
        loss_sum += token_loss_sum.detach()

    # Filled element by element: a Python number goes to the device as a kernel argument, with no copy
    # from host memory that would wait for the backward pass.
    local = torch.zeros(2 + len(flags), dtype=torch.float64, device=device)
    local[0] = loss_sum
    local[1] = local_tokens
    for index, flag in enumerate(flags):
        local[2 + index] = flag
    # NOTE: gloo's all-reduce blocks the host, so this is the wait for slower ranks. NCCL's returns
    # at once, so there the wait moves to the host read in compute_gradients.
    wait_started = time.perf_counter()
    totals = _all_reduce_sum(local)
    if timings is not None:
        timings["sync_wait_s"] = time.perf_counter() - wait_started
    return StepTotals(totals=totals, capacity=capacity)


def _parameters_with_grad(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.grad is not None]


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """Return the global (unsharded) L2 norm of the gradients."""
    norm = torch.nn.utils.get_total_norm([param.grad for param in _parameters_with_grad(model)], foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Gradients:
    loss: float  # mean token loss over the global batch
    grad_norm: float  # global L2 norm of the mean loss's gradients, before clipping, loss scale removed
    target_tokens: int
    flags: list[float]  # the flags passed to compute_gradients, summed over ranks
    # Multiply the accumulated gradients by this (and 1 / loss scale) to get the mean loss's gradients.
    grad_factor: float = 1.0


def compute_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    *,
    device: torch.device,
    fsdp_units: Sequence[FSDPModule] = (),
    loss_multiplier: float = 1.0,
    loss_scale: float = 1.0,
    flags: Sequence[float] = (),
    timings: dict[str, float] | None = None,
    sample_replicas: int = 1,
) -> Gradients:
    """Run forward and backward for the step and read the global loss, token count, flags and grad norm.

    The step's one host sync is here, after backward: the spike checks and the
    float16 overflow check decide on these values before the optimizer step.
    """
    step = forward_backward(
        model, micro_batches, device, fsdp_units, loss_multiplier=loss_multiplier, backward_scale=loss_scale,
        flags=flags, timings=timings, sample_replicas=sample_replicas,
    )
    norm = gradient_norm(model)
    values = torch.cat([step.totals, norm.reshape(1).to(step.totals.dtype)]).tolist()
    loss_sum, tokens, summed_flags, raw_norm = values[0], values[1], values[2:-1], values[-1]
    target_tokens = int(tokens) // sample_replicas
    if target_tokens == 0:
        raise ValueError("the global batch has no target tokens; check the data and model.seq_len")
    if timings is not None:
        timings["flags"] = summed_flags
    grad_factor = step.capacity / target_tokens
    return Gradients(loss=loss_sum / sample_replicas / target_tokens, grad_norm=raw_norm * grad_factor / loss_scale,
                     target_tokens=target_tokens, flags=summed_flags, grad_factor=grad_factor)


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    gradients: Gradients,
    *,
    lr: float,
    grad_clip: float | None,
    loss_scale: float = 1.0,
) -> None:
    """Rescale, unscale, clip with the already known global norm, and take the optimizer step.

    The three are one multiply by a Python float, which works the same on
    plain tensors and on FSDP2's DTensor gradients.
    """
    factor = gradients.grad_factor / loss_scale
    if grad_clip is not None:
        # Same coefficient as torch.nn.utils.clip_grad_norm_, clamped to 1.
        factor *= min(1.0, grad_clip / (gradients.grad_norm + 1e-6))
    if factor != 1.0:
        torch._foreach_mul_([param.grad for param in _parameters_with_grad(model)], factor)
    set_learning_rate(optimizer, lr)
    optimizer.step()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    *,
    lr: float,
    grad_clip: float | None,
    device: torch.device,
    fsdp_units: Sequence[FSDPModule] = (),
) -> StepResult:
    """Run one optimizer step; skip the update on every rank if the loss or grad norm is not finite.

    The loss and the grad norm are global values, so every rank takes the same decision.
    A skipped step still consumes its batch and its place in the LR schedule.
    """
    gradients = compute_gradients(model, micro_batches, device=device, fsdp_units=fsdp_units)
    skipped = not (math.isfinite(gradients.loss) and math.isfinite(gradients.grad_norm))
    if not skipped:
        apply_update(model, optimizer, gradients, lr=lr, grad_clip=grad_clip)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=gradients.loss, grad_norm=gradients.grad_norm, target_tokens=gradients.target_tokens, skipped=skipped)
