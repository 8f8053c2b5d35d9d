"""Train step: token-weighted gradient accumulation, rank split under FSDP, clipping, skipped steps.

Gradients that should agree are compared at rtol=1e-5, atol=1e-7 (float32): the
splits sum the same token losses in a different order, so they agree only up to
float32 rounding, not bit for bit.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from workers.data import IGNORE_INDEX, MicroBatch
from workers.model import ModelArgs, Transformer, build_model
from workers.parallel import apply_fsdp
from workers.step import apply_update, compute_gradients, forward_backward, train_step

ARGS = ModelArgs(n_layers=2, dim=32, n_heads=4, vocab_size=64, seq_len=128)
MODEL_SEED = 11
DATA_SEED = 5
CPU = torch.device("cpu")
RTOL, ATOL = 1e-5, 1e-7
WORLD_SIZE = 2
# Target tokens per sample: uneven on purpose, so weighting by micro-batch instead of by token shows.
TWO_SAMPLES = (10, 100)
FOUR_SAMPLES = (10, 100, 55, 128)
RANKS_TIMEOUT_S = 120


def make_batch(target_counts: tuple[int, ...]) -> MicroBatch:
    """One row per sample; row ``i`` has ``target_counts[i]`` targets, the rest is IGNORE_INDEX."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    rows = len(target_counts)
    inputs = torch.randint(0, ARGS.vocab_size, (rows, ARGS.seq_len), generator=generator)
    targets = torch.randint(0, ARGS.vocab_size, (rows, ARGS.seq_len), generator=generator)
    for row, count in enumerate(target_counts):
        targets[row, count:] = IGNORE_INDEX
    return MicroBatch(inputs=inputs, targets=targets, sample_indices=tuple(range(rows)))


def split_batch(batch: MicroBatch, start: int, stop: int, micro_batch: int) -> list[MicroBatch]:
    """Cut rows ``start`` .. ``stop - 1`` of ``batch`` into micro-batches of ``micro_batch`` rows."""
    return [
        MicroBatch(
            inputs=batch.inputs[row : row + micro_batch],
            targets=batch.targets[row : row + micro_batch],
            sample_indices=batch.sample_indices[row : row + micro_batch],
        )
        for row in range(start, stop, micro_batch)
    ]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def accumulated_gradients(model: Transformer, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward_backward(model, micro_batches, CPU)
    return gradients(model)


def assert_gradients_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL, msg=lambda text: f"{name}: {text}")


def test_loss_is_mean_over_target_tokens():
    model = build_model(ARGS, seed=MODEL_SEED)
    batch = make_batch(TWO_SAMPLES)

    result = compute_gradients(model, split_batch(batch, 0, 2, 1), device=CPU)

    with torch.no_grad():
        logits = model(batch.inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    assert result.target_tokens == sum(TWO_SAMPLES)
    assert result.loss == pytest.approx(float(expected), rel=RTOL, abs=ATOL)


def test_grad_factor_gives_gradients_of_the_mean_loss():
    # Most positions of TWO_SAMPLES are ignored, so the backward pass's divisor (every position)
    # differs from the target count and the factor must correct it.
    model = build_model(ARGS, seed=MODEL_SEED)
    batch = make_batch(TWO_SAMPLES)
    expected_model = build_model(ARGS, seed=MODEL_SEED)
    logits = expected_model(batch.inputs)
    F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX).backward()
    expected = gradients(expected_model)

    result = compute_gradients(model, split_batch(batch, 0, 2, 1), device=CPU)

    assert result.grad_factor == batch.targets.numel() / sum(TWO_SAMPLES)
    assert_gradients_close({name: grad * result.grad_factor for name, grad in gradients(model).items()}, expected)
    expected_norm = torch.linalg.vector_norm(torch.stack([grad.norm() for grad in expected.values()]))
    assert result.grad_norm == pytest.approx(float(expected_norm), rel=1e-5)


def test_accumulation_matches_one_micro_batch():
    model = build_model(ARGS, seed=MODEL_SEED)
    batch = make_batch(TWO_SAMPLES)

    one_pass = accumulated_gradients(model, split_batch(batch, 0, 2, micro_batch=2))
    two_passes = accumulated_gradients(model, split_batch(batch, 0, 2, micro_batch=1))

    assert_gradients_close(two_passes, one_pass)


def test_micro_batch_mean_loss_differs():
    # Control: averaging per-micro-batch mean losses weights the 10-token sample 10 times
    # too much, and the comparison above must be sharp enough to see that.
    model = build_model(ARGS, seed=MODEL_SEED)
    batch = make_batch(TWO_SAMPLES)
    token_weighted = accumulated_gradients(model, split_batch(batch, 0, 2, micro_batch=2))

    model.zero_grad(set_to_none=True)
    for micro_batch in split_batch(batch, 0, 2, micro_batch=1):
        logits = model(micro_batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), micro_batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        (loss / 2).backward()
    micro_batch_weighted = gradients(model)

    with pytest.raises(AssertionError):
        assert_gradients_close(micro_batch_weighted, token_weighted)


def test_batch_without_targets_rejected():
    model = build_model(ARGS, seed=MODEL_SEED)
    batch = make_batch((0, 0))

    with pytest.raises(ValueError, match="no target tokens"):
        compute_gradients(model, [batch], device=CPU)


def fsdp_rank_worker(rank: int, init_file: str, output_dir: str) -> None:
    """Compute one rank's FSDP2 gradients for FOUR_SAMPLES split over two ranks; rank 0 saves the full ones.

    Each rank takes half of the samples, as one micro-batch of 2 and as two micro-batches of 1.
    """
    # Keep gloo on the loopback interface and one thread per rank.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model = build_model(ARGS, seed=MODEL_SEED)
        units = apply_fsdp(model, mesh, param_dtype="float32", reduce_dtype="float32")
        batch = make_batch(FOUR_SAMPLES)
        per_rank = len(FOUR_SAMPLES) // WORLD_SIZE
        start = rank * per_rank

        results = {}
        for micro_batch in (1, 2):
            model.zero_grad(set_to_none=True)
            micro_batches = split_batch(batch, start, start + per_rank, micro_batch)
            loss_sum, target_tokens = forward_backward(model, micro_batches, CPU, units).totals[:2]
            # full_tensor() is a collective, so every rank gathers even though only rank 0 saves.
            full = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
            results[micro_batch] = {"grads": full, "loss_sum": loss_sum, "target_tokens": target_tokens}
        if rank == 0:
            torch.save(results, Path(output_dir) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path) -> dict:
    """Start the two FSDP ranks, wait at most RANKS_TIMEOUT_S and return rank 0's results."""
    # Fork, not spawn: the ranks inherit the imported torch, which saves seconds per rank.
    # The ranks run on one thread each, so no OpenMP pool is used after the fork.
    context = torch_mp.start_processes(
        fsdp_rank_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    try:
        # join() returns True once every rank exited cleanly and raises if one failed.
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"FSDP ranks did not finish within {RANKS_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return torch.load(tmp_path / "rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_two_ranks(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def one_process_reference() -> dict:
    """Gradients, loss sum and token count of FOUR_SAMPLES in one micro-batch on one process."""
    model = build_model(ARGS, seed=MODEL_SEED)
    loss_sum, target_tokens = forward_backward(model, [make_batch(FOUR_SAMPLES)], CPU).totals[:2]
    return {"grads": gradients(model), "loss_sum": loss_sum, "target_tokens": target_tokens}


@pytest.mark.parametrize("micro_batch", [1, 2], ids=["accumulate-2", "accumulate-1"])
def test_fsdp_rank_split_gradients(fsdp_results: dict, one_process_reference: dict, micro_batch: int):
    assert_gradients_close(fsdp_results[micro_batch]["grads"], one_process_reference["grads"])


@pytest.mark.parametrize("micro_batch", [1, 2], ids=["accumulate-2", "accumulate-1"])
def test_fsdp_rank_split_loss(fsdp_results: dict, one_process_reference: dict, micro_batch: int):
    result = fsdp_results[micro_batch]

    assert result["target_tokens"] == sum(FOUR_SAMPLES)
    torch.testing.assert_close(result["loss_sum"], one_process_reference["loss_sum"], rtol=RTOL, atol=0)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def test_train_step_updates_parameters():
    model = build_model(ARGS, seed=MODEL_SEED)
    optimizer = build_optimizer(model)
    before = snapshot(model)

    result = train_step(model, optimizer, [make_batch(TWO_SAMPLES)], lr=5e-3, grad_clip=1.0, device=CPU)

    assert not result.skipped
    assert math.isfinite(result.loss)
    assert result.target_tokens == sum(TWO_SAMPLES)
    assert optimizer.param_groups[0]["lr"] == 5e-3
    assert not torch.equal(model.output.weight, before["output.weight"])
    assert all(param.grad is None for param in model.parameters())


def test_nan_loss_skips_optimizer_step():
    model = build_model(ARGS, seed=MODEL_SEED)
    optimizer = build_optimizer(model)
    with torch.no_grad():
        # The final norm feeds every logit, so one NaN weight makes the loss NaN.
        model.norm.weight[0] = float("nan")
    before = snapshot(model)

    result = train_step(model, optimizer, [make_batch(TWO_SAMPLES)], lr=5e-3, grad_clip=1.0, device=CPU)

    assert result.skipped
    assert math.isnan(result.loss)
    assert optimizer.state == {}
    assert all(param.grad is None for param in model.parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=lambda text: f"{name}: {text}")


def test_clip_uses_norm_before_clipping():
    model = build_model(ARGS, seed=MODEL_SEED)
    result = compute_gradients(model, [make_batch(TWO_SAMPLES)], device=CPU)
    # The accumulated gradients times grad_factor are the mean loss's gradients.
    unclipped = result.grad_factor * torch.linalg.vector_norm(torch.stack([param.grad.norm() for param in model.parameters()]))
    assert unclipped > 1e-3
    torch.testing.assert_close(torch.tensor(result.grad_norm), unclipped, rtol=RTOL, atol=0)

    # lr=0: the step leaves the weights alone, and the gradients show what was clipped.
    apply_update(model, torch.optim.SGD(model.parameters(), lr=0.0), result, lr=0.0, grad_clip=1e-3)

    clipped = torch.linalg.vector_norm(torch.stack([param.grad.norm() for param in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)


def test_clip_disabled_only_rescales_gradients():
    model = build_model(ARGS, seed=MODEL_SEED)
    result = compute_gradients(model, [make_batch(TWO_SAMPLES)], device=CPU)
    before = gradients(model)

    apply_update(model, torch.optim.SGD(model.parameters(), lr=0.0), result, lr=0.0, grad_clip=None)

    for name, grad in gradients(model).items():
        assert torch.equal(grad, before[name] * result.grad_factor), name
