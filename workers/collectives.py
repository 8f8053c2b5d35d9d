"""Small collectives that move JSON values between ranks as byte tensors, so nothing is pickled."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def _device(group: dist.ProcessGroup | None) -> torch.device:
    # NCCL moves only CUDA tensors; every other backend here is gloo, which moves CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(payload: Any, device: torch.device) -> torch.Tensor:
    data = json.dumps(payload).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else torch.zeros(0, dtype=torch.uint8, device=device)


def _decode(tensor: torch.Tensor, length: int) -> Any:
    return json.loads(bytes(tensor[:length].cpu().numpy().tobytes()).decode("utf-8"))


def all_gather_json(payload: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Return every rank's ``payload``, indexed by rank in ``group``; a collective over ``group``."""
    device = _device(group)
    world_size = dist.get_world_size(group)
    local = _encode(payload, device)
    length = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(item.item()) for item in lengths]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [_decode(tensor, size) for tensor, size in zip(gathered, sizes)]


def broadcast_json(payload: Any, group: dist.ProcessGroup | None = None) -> Any:
    """Return the ``payload`` of the group's first rank on every rank; a collective over ``group``."""
    device = _device(group)
    source = dist.get_global_rank(group, 0) if group is not None else 0
    is_source = dist.get_rank() == source
    local = _encode(payload, device) if is_source else torch.zeros(0, dtype=torch.uint8, device=device)
    length = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    dist.broadcast(length, src=source, group=group)
    buffer = local if is_source else torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=source, group=group)
    return _decode(buffer, int(length.item()))
