"""FLOPs per token against a hand count and against torch's FlopCounterMode; MFU; the device peak table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from workers.flops import (
    DEVICE_PEAKS,
    find_device_peak,
    forward_flops,
    forward_flops_per_token,
    mfu,
    peak_flops_for_device,
    training_flops_per_token,
)
from workers.model import ModelArgs, build_model

# dim 64, 4 query heads and 2 key/value heads of head_dim 16, SwiGLU hidden width
# 64 * ceil(int(8 * 64 / 3) / 64) = 64 * ceil(170 / 64) = 192.
TINY = ModelArgs(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=264, seq_len=32)

CONFIGS = {
    "gqa": TINY,
    "mha": ModelArgs(n_layers=2, dim=64, n_heads=4, vocab_size=264, seq_len=32),
    "tied-custom-ffn": ModelArgs(n_layers=3, dim=48, n_heads=6, n_kv_heads=3, vocab_size=100, seq_len=24,
                                 ffn_hidden=80, tie_embeddings=True),
}


def test_tiny_hidden_dim_as_assumed():
    assert TINY.hidden_dim == 192


def test_forward_hand_count():
    counts = forward_flops(TINY)

    # Per layer: wq 2*64*64 + wk 2*64*32 + wv 2*64*32 + wo 2*64*64 = 8192 + 4096 + 4096 + 8192.
    assert counts.attention_projections == 2 * (8192 + 4096 + 4096 + 8192)
    # Per layer: Q @ K^T 2 * (4 heads * 16) * 32 keys = 4096, weights @ V the same.
    assert counts.attention_scores == 2 * (4096 + 4096)
    # Per layer: w1, w3 and w2, each 2 * 64 * 192 = 24576.
    assert counts.feed_forward == 2 * 3 * 24576
    # Once: 2 * 64 * 264.
    assert counts.output_head == 33792
    assert counts.total == 49152 + 16384 + 147456 + 33792
    assert forward_flops_per_token(TINY) == 246784


def test_causal_hand_count():
    counts = forward_flops(TINY, causal=True)

    # Query t (1-based) attends to t keys: (1 + ... + 32) / 32 = 16.5 keys on average instead of 32.
    assert counts.attention_scores == 2 * (2 * 2 * 64 * 16.5)
    assert counts.attention_projections == forward_flops(TINY).attention_projections
    assert forward_flops_per_token(TINY, causal=True) == 246784 - 16384 + 8448


def test_training_is_three_times_forward():
    assert training_flops_per_token(TINY) == 3 * 246784
    assert training_flops_per_token(TINY, causal=True) == 3 * forward_flops_per_token(TINY, causal=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matmul_terms_match_linear_weights(name):
    """Every weight element of every nn.Linear is one multiply-add per token."""
    args = CONFIGS[name]
    model = build_model(args, seed=0)
    linear_weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))
    counts = forward_flops(args)

    assert counts.total - counts.attention_scores == 2 * linear_weights


def count_training_flops(args: ModelArgs, batch: int, backend: SDPBackend | None) -> int:
    """Run forward, loss and backward of the real model under FlopCounterMode and return its total."""
    torch.manual_seed(0)
    model = build_model(args, seed=0)
    tokens = torch.randint(0, args.vocab_size, (batch, args.seq_len))
    targets = torch.randint(0, args.vocab_size, (batch, args.seq_len))
    with FlopCounterMode(display=False) as counter:
        if backend is None:
            logits = model(tokens)
        else:
            with sdpa_kernel(backend):
                logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flop_counter_math_backend_matches(name):
    """The math backend runs attention as batched matmuls, which FlopCounterMode counts.

    Tolerance: none. Both sides count the same matmuls at 2 FLOPs per
    multiply-add, and FlopCounterMode also counts the full attention square
    for a causal mask, so any difference is a missed or extra term. At this
    size the k/v projections are about 7% of the total, so a tolerance of a few
    percent would hide a wrong grouped-query count.
    """
    args = CONFIGS[name]
    batch = 3

    counted = count_training_flops(args, batch, SDPBackend.MATH)

    assert counted == batch * args.seq_len * training_flops_per_token(args)


def test_flop_counter_cpu_kernel_skips_attention():
    """On CPU (torch 2.13) FlopCounterMode has no formula for the fused SDPA kernel.

    workers/flops.py states this; if torch starts counting it, update that note.
    """
    batch = 2
    counts = forward_flops(TINY)
    without_scores = 3 * (counts.total - counts.attention_scores)

    counted = count_training_flops(TINY, batch, None)

    assert counted == batch * TINY.seq_len * without_scores


def test_mfu_worked_example():
    # 8 devices of 1e15 FLOP/s; 1e5 tokens/s at 6e9 FLOPs per token is 6e14 FLOP/s.
    assert mfu(1e5, 6e9, 1e15, 8) == pytest.approx(0.075)


def test_mfu_without_peak_is_none():
    assert mfu(1e5, 6e9, None, 1) is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((-1.0, 6e9, 1e15, 1), "tokens_per_second"),
        ((1.0, 0.0, 1e15, 1), "flops_per_token"),
        ((1.0, 6e9, 1e15, 0), "num_devices"),
        ((1.0, 6e9, 0.0, 1), "peak_flops_per_device"),
    ],
)
def test_mfu_rejects_invalid(arguments, message):
    with pytest.raises(ValueError, match=message):
        mfu(*arguments)


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("nvidia l40s", 362e12),
        ("NVIDIA RTX A1000", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_peak_lookup_by_device_name(device_name, expected):
    assert peak_flops_for_device(device_name) == expected


@pytest.mark.parametrize("entry", DEVICE_PEAKS, ids=lambda entry: entry.name_pattern)
def test_each_table_entry_finds_itself(entry):
    """A less specific pattern earlier in the table would shadow this one."""
    assert find_device_peak(f"NVIDIA {entry.name_pattern}") is entry


@pytest.mark.parametrize("entry", DEVICE_PEAKS, ids=lambda entry: entry.name_pattern)
def test_table_sources_say_datasheet_or_estimate(entry):
    if entry.estimate:
        assert entry.source.startswith("estimate")
    else:
        assert "datasheet" in entry.source
