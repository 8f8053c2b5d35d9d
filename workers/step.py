"""One optimizer step, as named phases: forward/backward, clip, non-finite check, optimizer step.

The loss of every micro-batch is its summed token cross-entropy divided by the
number of target tokens in the whole global batch (all micro-batches, all
ranks). Gradients are summed over ranks, so splitting a batch differently
gives the same gradient.
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
) -> tuple[torch.Tensor, int]:
    """Accumulate gradients over this rank's micro-batches; return (global loss sum, global target tokens).

    ``loss_multiplier`` scales the loss itself (fault injection of a spike);
    ``backward_scale`` scales only what is backpropagated (float16 loss
    scaling), so the returned loss is unaffected by it. Gradient reduction
    across ranks runs only on the last micro-batch.

    ``flags`` ride along with the token count in the step's first collective;
    their sums over ranks land in ``timings["flags"]`` when ``timings`` is given,
    with the seconds this rank waited in that collective in ``timings["sync_wait_s"]``.

    ``sample_replicas`` is the number of ranks that train on each sample (the
    tensor-parallel size): sums over all ranks count each token and its loss
    that many times, so they are divided by it.
    """
    local_tokens = sum(batch.num_target_tokens for batch in micro_batches)
    counts = torch.tensor([local_tokens, *flags], dtype=torch.float64, device=device)
    wait_started = time.perf_counter()
    counts = _all_reduce_sum(counts).tolist()
    if timings is not None:
        timings["sync_wait_s"] = time.perf_counter() - wait_started
        timings["flags"] = counts[1:]
    global_tokens = int(counts[0]) // sample_replicas
    if global_tokens == 0:
        raise ValueError("the global batch has no target tokens; check the data and model.seq_len")

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
        (token_loss_sum * (backward_scale / global_tokens)).backward()
        loss_sum += token_loss_sum.detach()
    loss_sum = _all_reduce_sum(loss_sum)
    if sample_replicas > 1:
        loss_sum = loss_sum / sample_replicas
    return loss_sum, global_tokens


def _parameters_with_grad(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.grad is not None]


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """Return the global (unsharded) L2 norm of the gradients."""
    norm = torch.nn.utils.get_total_norm([param.grad for param in _parameters_with_grad(model)], foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip to ``max_norm`` (when set) and return the global gradient norm before clipping."""
    norm = gradient_norm(model)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(_parameters_with_grad(model), max_norm, norm, foreach=True)
    return norm


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Gradients:
    loss: float  # mean token loss over the global batch
    grad_norm: float  # global L2 norm before clipping, with any loss scale removed
    target_tokens: int


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
    """Run forward and backward for the step and read the global loss and grad norm (one host sync)."""
    loss_sum, global_tokens = forward_backward(
        model, micro_batches, device, fsdp_units, loss_multiplier=loss_multiplier, backward_scale=loss_scale,
        flags=flags, timings=timings, sample_replicas=sample_replicas,
    )
    norm = gradient_norm(model)
    values = torch.stack([loss_sum / global_tokens, norm.to(loss_sum.dtype) / loss_scale]).tolist()
    return Gradients(loss=values[0], grad_norm=values[1], target_tokens=global_tokens)


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    gradients: Gradients,
    *,
    lr: float,
    grad_clip: float | None,
    loss_scale: float = 1.0,
) -> None:
    """Unscale, clip with the already known global norm, and take the optimizer step.

    Unscaling and clipping are one multiply by a Python float, which works the
    same on plain tensors and on FSDP2's DTensor gradients.
    """
    factor = 1.0 / loss_scale
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
