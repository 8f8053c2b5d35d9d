"""Memory planner: byte counts derived by hand per strategy, the activation count against autograd, measured peaks.

The hand derivations below use a model whose every dim-0 size is even, so a
2-way shard is exactly half. The uneven case has a test of its own. The
measured check runs bench/memory_check.py's cases on gloo ranks and requires
the planner to be within 15% of the peak the PyTorch profiler measured.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.memory_check import CASES, Measurement, measure_cases
from dist_helpers import run_distributed
from service.cli import main as cli_main
from service.planner import (
    LESSON_7B,
    PlanInputs,
    block_activation_bytes,
    candidate_settings,
    estimate_memory,
    parameter_count,
    recommend,
)
from workers.model import ModelArgs, build_model, count_parameters

# 2 blocks of width 64, SwiGLU width 128, vocabulary 128, untied head.
SMALL = PlanInputs(n_layers=2, dim=64, n_heads=4, vocab_size=128, ffn_hidden=128, seq_len=32, micro_batch=2,
                   world_size=2)
BLOCK_PARAMS = 4 * 64 * 64 + 3 * 128 * 64 + 2 * 64  # wq, wk, wv, wo; w1, w3, w2; two norms
ROOT_PARAMS = 128 * 64 + 64 + 128 * 64  # embedding, final norm, output head
PARAMS = 2 * BLOCK_PARAMS + ROOT_PARAMS
FLOAT32 = 4
BFLOAT16 = 2
MEASURED_TOLERANCE = 0.15


def test_parameter_count_matches_model():
    args = ModelArgs(n_layers=2, dim=64, n_heads=4, vocab_size=128, seq_len=32, ffn_hidden=128)
    assert parameter_count(SMALL) == PARAMS
    assert count_parameters(build_model(args, seed=0)) == PARAMS


def test_ddp_keeps_sixteen_bytes_per_parameter():
    estimate = estimate_memory(replace(SMALL, strategy="ddp"))
    assert estimate.parameters_bytes == FLOAT32 * PARAMS  # float32 master weights
    assert estimate.gradients_bytes == FLOAT32 * PARAMS  # DDP's buckets
    assert estimate.optimizer_bytes == 2 * FLOAT32 * PARAMS  # exp_avg and exp_avg_sq
    assert estimate.parameters_bytes + estimate.gradients_bytes + estimate.optimizer_bytes == 16 * PARAMS


def test_zero1_shards_only_optimizer_state():
    estimate = estimate_memory(replace(SMALL, strategy="zero1"))
    assert estimate.parameters_bytes == FLOAT32 * PARAMS
    assert estimate.gradients_bytes == FLOAT32 * PARAMS
    assert estimate.optimizer_bytes == 2 * FLOAT32 * PARAMS // 2


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_fsdp_strategies_shard_all_state(strategy):
    estimate = estimate_memory(replace(SMALL, strategy=strategy))
    assert estimate.parameters_bytes == FLOAT32 * PARAMS // 2
    assert estimate.gradients_bytes == FLOAT32 * PARAMS // 2
    assert estimate.optimizer_bytes == 2 * FLOAT32 * PARAMS // 2


def test_zero2_keeps_every_unit_unsharded():
    zero2 = estimate_memory(replace(SMALL, strategy="zero2"))
    zero3 = estimate_memory(replace(SMALL, strategy="zero3"))
    # zero3: the root unit and two blocks in flight; zero2: the root and both blocks (2 layers: the same).
    in_flight_grads = FLOAT32 * (128 * 64 + BLOCK_PARAMS) + FLOAT32 * BLOCK_PARAMS
    assert zero3.gather_bytes == FLOAT32 * (ROOT_PARAMS + 2 * BLOCK_PARAMS) + in_flight_grads
    deeper = replace(SMALL, n_layers=6)
    assert (estimate_memory(replace(deeper, strategy="zero2")).gather_bytes
            - estimate_memory(replace(deeper, strategy="zero3")).gather_bytes) == FLOAT32 * 4 * BLOCK_PARAMS
    assert zero2.largest_unit_gather_bytes == FLOAT32 * BLOCK_PARAMS


def test_hsdp_shards_within_group():
    estimate = estimate_memory(replace(SMALL, world_size=8, strategy="hsdp", hsdp_shard_size=2))
    assert estimate.parameters_bytes == FLOAT32 * PARAMS // 2
    assert estimate.optimizer_bytes == 2 * FLOAT32 * PARAMS // 2


def test_uneven_rows_count_the_largest_chunk():
    # vocabulary 130 over 4 ranks: torch.chunk gives 33 rows to rank 0.
    inputs = replace(SMALL, vocab_size=130, world_size=4, strategy="zero3")
    expected = 2 * (BLOCK_PARAMS // 4) + 33 * 64 + 16 + 33 * 64
    assert estimate_memory(inputs).parameters_bytes == FLOAT32 * expected


def test_bfloat16_keeps_float32_state_and_low_precision_copies():
    estimate = estimate_memory(replace(SMALL, strategy="zero3", param_dtype="bfloat16"))
    assert estimate.parameters_bytes == FLOAT32 * PARAMS // 2
    in_flight_params = BFLOAT16 * (ROOT_PARAMS + 2 * BLOCK_PARAMS)
    in_flight_grads = BFLOAT16 * (128 * 64 + BLOCK_PARAMS) + FLOAT32 * BLOCK_PARAMS  # reduce dtype float32
    assert estimate.gather_bytes == in_flight_params + in_flight_grads


def test_ddp_autocast_copies_matrices_only():
    estimate = estimate_memory(replace(SMALL, strategy="ddp", param_dtype="bfloat16"))
    matrices = PARAMS - 128 * 64 - (2 * 2 + 1) * 64  # not the embedding, not the norms
    assert estimate.gather_bytes == BFLOAT16 * matrices


def test_cpu_offload_moves_state_to_host():
    offloaded = estimate_memory(replace(SMALL, strategy="zero3", cpu_offload=True))
    resident = estimate_memory(replace(SMALL, strategy="zero3"))
    state = FLOAT32 * PARAMS // 2 * 4  # parameters, gradients, two moments
    assert offloaded.host_bytes == state + resident.optimizer_step_bytes
    # The device keeps what is in flight plus the largest unit's shard, copied over before its all-gather.
    device_state = FLOAT32 * PARAMS // 2 * 3  # parameters and moments, resident at the backward peak
    assert offloaded.peak_bytes == resident.backward_peak_bytes - device_state + FLOAT32 * BLOCK_PARAMS // 2
    assert offloaded.unified_peak_bytes == resident.unified_peak_bytes


def test_recomputation_keeps_block_inputs():
    none = estimate_memory(replace(SMALL, n_layers=4))
    full = estimate_memory(replace(SMALL, n_layers=4, activation_checkpointing="full"))
    block_input = SMALL.tokens * SMALL.dim * FLOAT32
    per_block = block_activation_bytes(SMALL)
    # Full: every block keeps its input, and the last block is recomputed whole before its backward.
    assert none.activations_bytes - full.activations_bytes == 4 * per_block - (4 * block_input + per_block)
    selective = estimate_memory(replace(SMALL, n_layers=4, activation_checkpointing="selective", checkpoint_every=2))
    assert none.activations_bytes - selective.activations_bytes == 2 * (per_block - block_input)


def _saved_block_bytes(args: ModelArgs, micro_batch: int, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for one block's backward: distinct storages that are not parameters."""
    model = build_model(args, seed=0).to(dtype)
    tokens = torch.randint(0, args.vocab_size, (micro_batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    hidden = model.tok_embeddings(tokens).detach().requires_grad_()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.layers[0](hidden, model.rope_cos, model.rope_sin)
    excluded = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers(), hidden]}
    return sum(size for pointer, size in storages.items() if pointer not in excluded)


@pytest.mark.parametrize("dtype, kv_heads", [("float32", None), ("bfloat16", None), ("float32", 2)])
def test_block_activations_match_autograd(dtype, kv_heads):
    args = ModelArgs(n_layers=1, dim=128, n_heads=8, n_kv_heads=kv_heads, vocab_size=256, seq_len=64)
    inputs = PlanInputs(n_layers=1, dim=128, n_heads=8, n_kv_heads=kv_heads, vocab_size=256, seq_len=64,
                        micro_batch=2, world_size=1, param_dtype=dtype)
    # The block's input is saved by its first RMSNorm; here it is the test's leaf tensor, so add it back.
    block_input = inputs.tokens * inputs.dim * inputs.compute_bytes
    saved = _saved_block_bytes(args, 2, getattr(torch, dtype))
    assert saved + (block_input if dtype == "float32" else 0) == block_activation_bytes(inputs)


def test_recommendation_is_fastest_that_fits():
    inputs = replace(SMALL, world_size=4)
    candidates = [estimate_memory(option) for option in candidate_settings(inputs)]
    ddp = candidates[0]
    assert ddp.inputs.strategy == "ddp"
    assert ddp.inputs.activation_checkpointing == "none"
    choice = recommend(inputs, ddp.peak_bytes - 1).estimate
    assert choice is not None
    expected = next(candidate for candidate in candidates if candidate.peak_bytes <= ddp.peak_bytes - 1)
    assert choice.inputs == expected.inputs
    assert choice.inputs.strategy != "ddp" or choice.inputs.activation_checkpointing != "none"
    assert recommend(inputs, ddp.peak_bytes).estimate.inputs == ddp.inputs


def test_recommendation_none_when_nothing_fits():
    assert recommend(SMALL, 1024).estimate is None


def test_lesson_example_state_is_sixteen_bytes_per_parameter():
    estimate = estimate_memory(LESSON_7B)
    params = parameter_count(LESSON_7B)
    assert params == 6_738_415_616
    assert estimate.parameters_bytes + estimate.gradients_bytes + estimate.optimizer_bytes == 16 * params


def test_plan_command_prints_lesson_comparison(capsys):
    assert cli_main(["plan", "--example", "lesson-7b", "--device-memory-gib", "80"]) == 0
    output = capsys.readouterr().out
    assert "105.5 GB" in output
    assert "107.8 GB" in output
    assert "recommended for 80.0 GiB" in output


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Measurement]:
    output_dir = tmp_path_factory.mktemp("memory")
    rows: dict[str, Measurement] = {}
    for world_size in sorted({size for _, _, size in CASES}):
        cases = [(name, parallel) for name, parallel, size in CASES if size == world_size]
        run_distributed(measure_cases, world_size, cases, "cpu", str(output_dir), timeout_s=600)
        for line in Path(output_dir, f"world-{world_size}.jsonl").read_text().splitlines():
            row = Measurement(**json.loads(line))
            rows[row.case] = row
    return rows


@pytest.mark.parametrize("case", [name for name, _, _ in CASES])
def test_planner_within_15_percent_of_measured(measured, case):
    row = measured[case]
    assert abs(row.error) <= MEASURED_TOLERANCE, (
        f"{case}: planned {row.planned_bytes / 2**20:.3f} MiB, measured {row.measured_bytes / 2**20:.3f} MiB")
