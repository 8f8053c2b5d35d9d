"""Model FLOPs per token and model FLOPs utilization (MFU).

Only matrix multiplications are counted, at 2 FLOPs per multiply-add. Norms,
RoPE, softmax, SiLU, the residual adds, the embedding lookup (a gather) and the
loss are left out, as the usual MFU convention and
``torch.utils.flop_counter.FlopCounterMode`` leave them out.

Attention scores are counted over the full ``seq_len x seq_len`` square by
default, although a causal mask makes half of it unnecessary. That is the usual
convention for MFU, so figures compare with published ones, and it is what
``FlopCounterMode`` (torch 2.13) counts for ``scaled_dot_product_attention``
with ``is_causal=True`` on CUDA and on the math backend. Pass ``causal=True``
for the work a causal kernel really needs: each query position ``t`` (1-based)
attends to ``t`` keys, so ``(seq_len + 1) / 2`` keys on average.

NOTE: with torch 2.13 on CPU, ``FlopCounterMode`` counts no FLOPs at all for
``scaled_dot_product_attention``, because the CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has no registered formula. On
CPU its total is therefore the non-attention part of this count only.

A training step is forward plus backward, and the backward pass of a matmul is
two matmuls of the same size (input gradient and weight gradient), so training
costs 3x forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from workers.model import ModelArgs

TRAINING_TO_FORWARD_RATIO = 3


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token of the whole model, by group of matmuls."""

    attention_projections: float  # q, k, v and output projections, all layers
    attention_scores: float  # Q @ K^T and the weighted sum of values, all layers
    feed_forward: float  # SwiGLU gate, up and down projections, all layers
    output_head: float  # final projection to vocabulary logits

    @property
    def total(self) -> float:
        return self.attention_projections + self.attention_scores + self.feed_forward + self.output_head


def forward_flops(args: ModelArgs, *, causal: bool = False) -> ForwardFlops:
    """Count the forward FLOPs per token of a model with sequences of ``args.seq_len`` tokens.

    ``causal=False`` counts every query against all ``seq_len`` keys; ``causal=True``
    counts only the keys a causal mask keeps. Tied embeddings do not change the
    count: the output head still runs its matmul.
    """
    query_width = args.n_heads * args.head_dim
    kv_width = args.kv_heads * args.head_dim

    # Each projection maps one token's vector through one weight matrix.
    projections = 2 * args.dim * query_width  # wq
    projections += 2 * 2 * args.dim * kv_width  # wk and wv (narrower under grouped-query attention)
    projections += 2 * query_width * args.dim  # wo

    # Scores and the weighted sum each take head_dim multiply-adds per (query head, key) pair.
    # Grouped-query attention shares keys and values but not this work.
    keys_per_query = (args.seq_len + 1) / 2 if causal else args.seq_len
    scores = 2 * 2 * query_width * keys_per_query

    feed_forward = 3 * 2 * args.dim * args.hidden_dim  # w1, w3 and w2
    output_head = 2 * args.dim * args.vocab_size

    return ForwardFlops(
        attention_projections=float(args.n_layers * projections),
        attention_scores=float(args.n_layers * scores),
        feed_forward=float(args.n_layers * feed_forward),
        output_head=float(output_head),
    )


def forward_flops_per_token(args: ModelArgs, *, causal: bool = False) -> float:
    return forward_flops(args, causal=causal).total


def training_flops_per_token(args: ModelArgs, *, causal: bool = False) -> float:
    """Forward plus backward FLOPs per token: 3x forward."""
    return TRAINING_TO_FORWARD_RATIO * forward_flops_per_token(args, causal=causal)


def mfu(
    tokens_per_second: float,
    flops_per_token: float,
    peak_flops_per_device: float | None,
    num_devices: int,
) -> float | None:
    """Return achieved FLOP/s over peak FLOP/s of all devices (0.4 means 40%), or None without a peak.

    ``flops_per_token`` is the training cost (``training_flops_per_token``) and
    ``tokens_per_second`` the throughput of all devices together.
    """
    if tokens_per_second < 0:
        raise ValueError(f"tokens_per_second must be at least 0, got {tokens_per_second}")
    if flops_per_token <= 0:
        raise ValueError(f"flops_per_token must be positive, got {flops_per_token}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if peak_flops_per_device is None:
        return None
    if peak_flops_per_device <= 0:
        raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
    return tokens_per_second * flops_per_token / (peak_flops_per_device * num_devices)


@dataclass(frozen=True)
class DevicePeak:
    """Dense (no structured sparsity) bf16 tensor-core peak of one device model."""

    name_pattern: str  # whole words of torch.cuda.get_device_name(), any case
    flops: float
    source: str
    estimate: bool = False


# A pattern matches whole words only, so "A10" does not match "NVIDIA A100" or
# "RTX A1000", and "L4" does not match "L40S". Vendor datasheets list the
# tensor-core figure with 2:4 sparsity; the dense figure used here is half of it.
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 NVL", 835e12, "NVIDIA H100 datasheet: 1,671 TFLOPS bf16 with sparsity"),
    DevicePeak("H100 PCIe", 756e12, "NVIDIA H100 datasheet: 1,513 TFLOPS bf16 with sparsity"),
    DevicePeak("H100", 989e12, "NVIDIA H100 datasheet, SXM: 1,979 TFLOPS bf16 with sparsity"),
    DevicePeak("H200 NVL", 835e12, "NVIDIA H200 datasheet: 1,671 TFLOPS bf16 with sparsity"),
    DevicePeak("H200", 989e12, "NVIDIA H200 datasheet, SXM: 1,979 TFLOPS bf16 with sparsity"),
    DevicePeak("GH200", 989e12, "NVIDIA GH200 datasheet: 1,979 TFLOPS bf16 with sparsity"),
    DevicePeak("B200", 2.25e15, "NVIDIA HGX B200 datasheet: 36 PFLOPS bf16 with sparsity for 8 GPUs"),
    DevicePeak("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)"),
    DevicePeak(
        "A10G", 70e12,
        "estimate: AWS's A10G is not on an NVIDIA datasheet; about 70 TFLOPS is the figure third-party spec tables give",
        estimate=True,
    ),
    DevicePeak("A10", 125e12, "NVIDIA A10 datasheet: 125 TFLOPS bf16 dense (250 with sparsity)"),
    DevicePeak("L40S", 362e12, "NVIDIA L40S datasheet: 733 TFLOPS bf16 with sparsity"),
    DevicePeak("L40", 181e12, "NVIDIA L40 datasheet: 362 TFLOPS bf16 with sparsity"),
    DevicePeak("L4", 121e12, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity"),
    DevicePeak("MI300X", 1307e12, "AMD Instinct MI300X datasheet: 1,307.4 TFLOPS bf16 dense"),
)


def find_device_peak(device_name: str) -> DevicePeak | None:
    """Return the first entry whose pattern occurs as whole words in ``device_name`` (any case), or None."""
    for peak in DEVICE_PEAKS:
        if re.search(rf"\b{re.escape(peak.name_pattern)}\b", device_name, flags=re.IGNORECASE):
            return peak
    return None


def peak_flops_for_device(device_name: str) -> float | None:
    """Return the dense bf16 peak FLOP/s of a device by its name, or None for an unknown device."""
    peak = find_device_peak(device_name)
    return None if peak is None else peak.flops


def current_device_peak(device_index: int = 0) -> tuple[str, DevicePeak | None]:
    """Return (device name, table entry) of a CUDA device; ("cpu", None) without CUDA.

    CPUs have no entry: their peak depends on the model, the cores and the
    vector units in use, so MFU on CPU needs a peak given by the caller.
    """
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(device_index)
    return name, find_device_peak(name)
