"""Parallelism strategies on real gloo process groups: losses against one process, checkpoints across strategies.

Every strategy trains the same tiny model on the same global batch as a
single process with plain AdamW. float32 losses and grad norms must agree to
rtol=1e-5: the strategies sum the same token losses in a different order, so
they agree up to float32 rounding, not bit for bit. The grad norm is the check
that catches a wrong gradient scale (averaged instead of summed, or counted
once per tensor-parallel rank), because AdamW's update hardly depends on it.
bfloat16 and float16 compute is compared at rtol=2e-2 on the loss and 5e-2 on
the grad norm, the rounding of 8 and 11 significand bits over a few steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from dist_helpers import run_distributed
from service.catalog import checkpoint_uri
from service.config import ConfigError, config_from_dict
from workers.checkpoint import TrainState, load_checkpoint, save_checkpoint
from workers.data import MicroBatch, rank_micro_batches
from workers.model import build_model
from workers.parallel import apply_activation_checkpointing, build_device_mesh, checkpointed_blocks, parallelize
from workers.stability import DynamicLossScaler
from workers.step import apply_update, compute_gradients
from workers.train_loop import build_optimizer, model_args

# vocab_size 66 splits unevenly over 4 ranks, so uneven shards are exercised.
MODEL = {"n_layers": 2, "dim": 32, "n_heads": 4, "vocab_size": 66, "seq_len": 16}
GLOBAL_BATCH = 8
MICRO_BATCH = 2
STEPS = 3
SEED = 3
LR = 1e-2
FP32_RTOL = 1e-5
LOW_PRECISION_LOSS_RTOL = 2e-2
LOW_PRECISION_NORM_RTOL = 5e-2
LOSS_SCALE = 2.0**12
CPU = torch.device("cpu")
RANKS_TIMEOUT_S = 600

TWO_RANK_CASES: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "zero1"},
    "zero2": {"strategy": "zero2"},
    "zero3": {"strategy": "zero3"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp-cpu-offload": {"strategy": "fsdp", "cpu_offload": True},
    "fsdp-full-recompute": {"strategy": "fsdp", "activation_checkpointing": "full"},
    "ddp-selective-recompute": {"strategy": "ddp", "activation_checkpointing": "selective", "checkpoint_every": 2},
    "fsdp-bfloat16": {"strategy": "fsdp", "param_dtype": "bfloat16"},
    "ddp-bfloat16": {"strategy": "ddp", "param_dtype": "bfloat16"},
    "zero2-float16": {"strategy": "zero2", "param_dtype": "float16"},
    "zero1-float16": {"strategy": "zero1", "param_dtype": "float16"},
}
FOUR_RANK_CASES: dict[str, dict[str, Any]] = {
    "hsdp": {"strategy": "hsdp", "hsdp_shard_size": 2},
    "fsdp-tp2": {"strategy": "fsdp", "tensor_parallel_size": 2},
    "zero2-tp2-full-recompute": {"strategy": "zero2", "tensor_parallel_size": 2, "activation_checkpointing": "full"},
    "zero1-uneven-rows": {"strategy": "zero1"},
}
# (saved under, resumed under)
INTERCHANGE_PAIRS = [("zero3", "ddp"), ("zero3", "hsdp"), ("ddp", "zero3"), ("hsdp", "zero3"), ("zero1", "zero2"),
                     ("zero3", "zero1"), ("fsdp-tp2", "zero3"), ("zero3", "fsdp-tp2"), ("fsdp-tp2", "ddp")]
STRATEGY_SETTINGS = {"ddp": {"strategy": "ddp"}, "zero1": {"strategy": "zero1"}, "zero2": {"strategy": "zero2"},
                     "zero3": {"strategy": "zero3"}, "hsdp": {"strategy": "hsdp", "hsdp_shard_size": 2},
                     "fsdp-tp2": {"strategy": "fsdp", "tensor_parallel_size": 2}}


def make_config(parallel: dict[str, Any], world_size: int) -> Any:
    return config_from_dict({"model": MODEL, "run": {"seed": SEED}, "scaling": {"num_workers": world_size},
                             "train": {"global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH},
                             "optim": {"lr": LR}, "parallel": parallel})


def step_tokens(step: int) -> torch.Tensor:
    """The global batch of ``step``: GLOBAL_BATCH rows of seq_len + 1 token ids."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, MODEL["vocab_size"], (GLOBAL_BATCH, MODEL["seq_len"] + 1), generator=generator)


def rank_batches(step: int, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    tokens = step_tokens(step)
    chunks = rank_micro_batches(list(range(GLOBAL_BATCH)), dp_rank, dp_size, MICRO_BATCH)
    return [MicroBatch(inputs=tokens[chunk, :-1], targets=tokens[chunk, 1:], sample_indices=tuple(chunk))
            for chunk in chunks]


class Training:
    """A model and optimizer under one strategy, stepped the way ``Trainer.run_step`` steps them."""

    def __init__(self, parallel: dict[str, Any], world_size: int):
        self.config = make_config(parallel, world_size)
        mesh = build_device_mesh("cpu", world_size, self.config.parallel)
        self.parallel = parallelize(build_model(model_args(self.config), seed=SEED), self.config.parallel, mesh)
        self.model = self.parallel.module
        self.optimizer = build_optimizer(self.model, self.config, self.parallel)
        self.scaler = None
        if self.config.parallel.param_dtype == "float16":
            self.scaler = DynamicLossScaler(LOSS_SCALE)

    def step(self, step: int) -> tuple[float, float]:
        scale = self.scaler.scale if self.scaler is not None else 1.0
        gradients = compute_gradients(self.model, rank_batches(step, self.parallel.dp_rank, self.parallel.dp_size),
                                      device=CPU, fsdp_units=self.parallel.sync_units, loss_scale=scale,
                                      sample_replicas=self.parallel.tp_size)
        assert math.isfinite(gradients.grad_norm), f"step {step}: non-finite grad norm"
        apply_update(self.model, self.optimizer, gradients, lr=LR, grad_clip=1.0, loss_scale=scale)
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        self.optimizer.zero_grad(set_to_none=True)
        return gradients.loss, gradients.grad_norm


def gather_to_rank0(value: Any) -> list[Any] | None:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered if dist.get_rank() == 0 else None


def write_json(output_dir: str, name: str, payload: Any) -> None:
    Path(output_dir, name).write_text(json.dumps(payload))


def train_cases_rank(world_rank: int, world_size: int, cases: dict[str, dict[str, Any]], output_dir: str) -> None:
    """Train every case for STEPS steps; rank 0 writes each rank's (loss, grad norm) per step and layout facts."""
    results = {}
    for name, parallel in cases.items():
        training = Training(parallel, world_size)
        history = [training.step(step) for step in range(1, STEPS + 1)]
        results[name] = {"history": gather_to_rank0(history), "layout": gather_to_rank0(layout_facts(training))}
    if world_rank == 0:
        write_json(output_dir, "results.json", results)


def layout_facts(training: Training) -> dict[str, Any]:
    """Where the first block's query weight and its optimizer state live on this rank."""
    model = training.parallel.module.module if hasattr(training.parallel.module, "module") else training.parallel.module
    weight = model.layers[0].attention.wq.weight
    facts: dict[str, Any] = {"weight_type": type(weight).__name__}
    if isinstance(weight, DTensor):
        facts["weight_placements"] = [repr(placement) for placement in weight.placements]
        facts["weight_local_shape"] = list(weight.to_local().shape)
    embedding_state = training.optimizer.state[model.tok_embeddings.weight]
    moment = embedding_state["exp_avg"]
    facts["embedding_moment_local_rows"] = (moment.to_local() if isinstance(moment, DTensor) else moment).shape[0]
    facts["embedding_moment_placements"] = [repr(p) for p in moment.placements] if isinstance(moment, DTensor) else None
    return facts


def full_state_copy(training: Training, options: StateDictOptions) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Return copies of the full model and optimizer state (a collective; the optimizer part is None off rank 0).

    Copies, because for whole parameters (ddp, zero1) the state dict contains the live tensors.
    """
    model_state = tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value,
                           get_model_state_dict(training.model, options=options))
    optimizer_state = get_optimizer_state_dict(training.model, training.optimizer, options=options).get("state")
    return model_state, tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, optimizer_state)


def interchange_rank(world_rank: int, world_size: int, pairs: list[tuple[str, str]], run_root: str, output_dir: str) -> None:
    """For each pair: train 2 steps under the first strategy, save, train 2 more; resume the save under the second."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    results = {}
    for index, (saved_under, resumed_under) in enumerate(pairs):
        run_uri = f"{run_root}/pair-{index}"
        original = Training(STRATEGY_SETTINGS[saved_under], world_size)
        for step in (1, 2):
            original.step(step)
        saved_model, saved_optimizer = full_state_copy(original, options)
        save_checkpoint(checkpoint_uri(run_uri, 2), model=original.model, optimizer=original.optimizer,
                        train_state=TrainState(step=2), run_uri=run_uri, config=original.config.model_dump(mode="json"),
                        world_rank=world_rank, world_size=world_size, storage_options={}, keep_last="all")
        continued = [original.step(step) for step in (3, 4)]

        resumed = Training(STRATEGY_SETTINGS[resumed_under], world_size)
        state = load_checkpoint(checkpoint_uri(run_uri, 2), model=resumed.model, optimizer=resumed.optimizer,
                                world_rank=world_rank, world_size=world_size, seed=SEED, storage_options={})
        loaded_model, loaded_optimizer = full_state_copy(resumed, options)
        after_resume = [resumed.step(step) for step in (3, 4)]
        if world_rank == 0:
            model_equal = {name: torch.equal(loaded_model[name], tensor) for name, tensor in saved_model.items()}
            optimizer_equal = {f"{name}.{key}": torch.equal(loaded_optimizer[name][key], value)
                               for name, moments in saved_optimizer.items() for key, value in moments.items()
                               if key in ("exp_avg", "exp_avg_sq")}
            results[f"{saved_under}->{resumed_under}"] = {
                "loaded_step": state.step, "continued": continued, "after_resume": after_resume,
                "model_equal": model_equal, "optimizer_equal": optimizer_equal,
                "model_keys_match": sorted(loaded_model) == sorted(saved_model),
            }
    if world_rank == 0:
        write_json(output_dir, "interchange.json", results)


def reference_history() -> list[tuple[float, float]]:
    """(loss, grad norm) per step of one process training on the whole global batch with plain AdamW."""
    config = make_config({"strategy": "fsdp"}, 1)
    model = build_model(model_args(config), seed=SEED)
    optimizer = build_optimizer(model, config)
    history = []
    for step in range(1, STEPS + 1):
        gradients = compute_gradients(model, rank_batches(step, 0, 1), device=CPU)
        apply_update(model, optimizer, gradients, lr=LR, grad_clip=1.0)
        optimizer.zero_grad(set_to_none=True)
        history.append((gradients.loss, gradients.grad_norm))
    return history


@pytest.fixture(scope="module")
def reference() -> list[tuple[float, float]]:
    return reference_history()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output_dir = tmp_path_factory.mktemp("two-ranks")
    run_distributed(train_cases_rank, 2, TWO_RANK_CASES, str(output_dir), timeout_s=RANKS_TIMEOUT_S)
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output_dir = tmp_path_factory.mktemp("four-ranks")
    run_distributed(train_cases_rank, 4, FOUR_RANK_CASES, str(output_dir), timeout_s=RANKS_TIMEOUT_S)
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def interchange_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output_dir = tmp_path_factory.mktemp("interchange")
    run_distributed(interchange_rank, 4, INTERCHANGE_PAIRS, str(output_dir / "runs"), str(output_dir),
                    timeout_s=RANKS_TIMEOUT_S)
    return json.loads((output_dir / "interchange.json").read_text())


def tolerances(parallel: dict[str, Any]) -> tuple[float, float]:
    if parallel.get("param_dtype", "float32") == "float32":
        return FP32_RTOL, FP32_RTOL
    return LOW_PRECISION_LOSS_RTOL, LOW_PRECISION_NORM_RTOL


def assert_history_matches(history: list[list[float]], reference: list[tuple[float, float]], parallel: dict[str, Any]) -> None:
    loss_rtol, norm_rtol = tolerances(parallel)
    for step, ((loss, norm), (expected_loss, expected_norm)) in enumerate(zip(history, reference), start=1):
        assert loss == pytest.approx(expected_loss, rel=loss_rtol), f"step {step} loss"
        assert norm == pytest.approx(expected_norm, rel=norm_rtol), f"step {step} grad norm"


@pytest.mark.parametrize("case", sorted(TWO_RANK_CASES))
def test_two_rank_strategy_matches_reference(two_rank_results, reference, case):
    assert_history_matches(two_rank_results[case]["history"][0], reference, TWO_RANK_CASES[case])


@pytest.mark.parametrize("case", sorted(FOUR_RANK_CASES))
def test_four_rank_strategy_matches_reference(four_rank_results, reference, case):
    assert_history_matches(four_rank_results[case]["history"][0], reference, FOUR_RANK_CASES[case])


@pytest.mark.parametrize("case", sorted(TWO_RANK_CASES) + sorted(f"4:{name}" for name in FOUR_RANK_CASES))
def test_loss_and_norm_same_on_every_rank(two_rank_results, four_rank_results, case):
    results = four_rank_results[case[2:]] if case.startswith("4:") else two_rank_results[case]
    histories = results["history"]
    assert all(history == histories[0] for history in histories), histories


def test_float16_differs_from_float32(two_rank_results):
    # Control: float16 compute must change the numbers, or the low-precision comparisons would prove nothing.
    float16 = two_rank_results["zero2-float16"]["history"][0]
    float32 = two_rank_results["zero2"]["history"][0]
    assert float16 != float32


def test_zero1_shards_optimizer_state(two_rank_results, four_rank_results):
    two = two_rank_results["zero1"]["layout"]
    four = four_rank_results["zero1-uneven-rows"]["layout"]
    # Parameters stay whole (DDP); each rank keeps its Shard(0) rows of the moments.
    assert two[0]["weight_type"] == "Parameter"
    assert two[0]["embedding_moment_placements"] == ["Shard(dim=0)"]
    assert [rank["embedding_moment_local_rows"] for rank in two] == [33, 33]
    # 66 rows over 4 ranks: torch.chunk gives 17, 17, 17, 15.
    assert [rank["embedding_moment_local_rows"] for rank in four] == [17, 17, 17, 15]


def test_ddp_keeps_whole_optimizer_state(two_rank_results):
    layout = two_rank_results["ddp"]["layout"]
    assert layout[0]["embedding_moment_placements"] is None
    assert layout[0]["embedding_moment_local_rows"] == MODEL["vocab_size"]


def test_fsdp_shards_parameters(two_rank_results):
    layout = two_rank_results["zero3"]["layout"]
    assert layout[0]["weight_placements"] == ["Shard(dim=0)"]
    assert layout[0]["weight_local_shape"] == [MODEL["dim"] // 2, MODEL["dim"]]


def test_hsdp_replicates_across_shard_groups(four_rank_results):
    layout = four_rank_results["hsdp"]["layout"]
    assert layout[0]["weight_placements"] == ["Replicate()", "Shard(dim=0)"]
    assert layout[0]["weight_local_shape"] == [MODEL["dim"] // 2, MODEL["dim"]]


def test_tensor_parallel_splits_projections(four_rank_results):
    layout = four_rank_results["fsdp-tp2"]["layout"]
    # wq is column-wise over "tp" (Shard(0)) and then sharded again by FSDP over "dp".
    assert layout[0]["weight_placements"][1] == "Shard(dim=0)"
    assert layout[0]["weight_local_shape"] == [MODEL["dim"] // 4, MODEL["dim"]]


@pytest.mark.parametrize("pair", [f"{saved}->{resumed}" for saved, resumed in INTERCHANGE_PAIRS])
def test_checkpoint_resumes_under_other_strategy(interchange_results, pair):
    result = interchange_results[pair]
    assert result["loaded_step"] == 2
    assert result["model_keys_match"]
    assert all(result["model_equal"].values()), [name for name, equal in result["model_equal"].items() if not equal]
    assert result["optimizer_equal"], "no optimizer moments were compared"
    assert all(result["optimizer_equal"].values()), [name for name, equal in result["optimizer_equal"].items() if not equal]
    for step, ((loss, norm), (expected_loss, expected_norm)) in enumerate(
            zip(result["after_resume"], result["continued"]), start=3):
        assert loss == pytest.approx(expected_loss, rel=FP32_RTOL), f"step {step} loss"
        assert norm == pytest.approx(expected_norm, rel=FP32_RTOL), f"step {step} grad norm"


# Single process: activation checkpointing and the settings.


def test_selective_checkpointing_picks_every_kth_block():
    assert checkpointed_blocks(5, "selective", 2) == [0, 2, 4]
    assert checkpointed_blocks(5, "full", 2) == [0, 1, 2, 3, 4]
    assert checkpointed_blocks(5, "none", 2) == []


def _gradients_and_block_calls(mode: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    config = make_config({"strategy": "fsdp"}, 1)
    model = build_model(model_args(config), seed=SEED)
    apply_activation_checkpointing(model, mode, 2)
    calls = [0] * len(model.layers)
    for index, block in enumerate(model.layers):
        # Count calls of the MLP's forward itself: recomputation runs without module hooks.
        def counted(x: torch.Tensor, index: int = index, forward=block.feed_forward.forward) -> torch.Tensor:
            calls[index] += 1
            return forward(x)

        block.feed_forward.forward = counted
    compute_gradients(model, rank_batches(1, 0, 1), device=CPU)
    return {name: param.grad.clone() for name, param in model.named_parameters()}, calls


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_keeps_gradients_bitwise(mode):
    expected, _ = _gradients_and_block_calls("none")
    actual, _ = _gradients_and_block_calls(mode)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("mode, forward_calls", [("none", [4, 4]), ("full", [8, 8]), ("selective", [8, 4])])
def test_recomputation_reruns_chosen_blocks(mode, forward_calls):
    # 4 micro-batches; a recomputed block runs its forward again in backward.
    _, calls = _gradients_and_block_calls(mode)
    assert calls == forward_calls


@pytest.mark.parametrize("parallel, message", [
    ({"strategy": "hsdp"}, "needs parallel.hsdp_shard_size"),
    ({"strategy": "fsdp", "hsdp_shard_size": 2}, "applies only to strategy 'hsdp'"),
    ({"strategy": "ddp", "cpu_offload": True}, "needs an FSDP strategy"),
    ({"strategy": "zero1", "reduce_dtype": "bfloat16"}, "needs an FSDP strategy"),
    ({"strategy": "ddp", "tensor_parallel_size": 2}, "works with strategies fsdp, zero3 and zero2"),
    ({"strategy": "hsdp", "hsdp_shard_size": 3}, "does not divide the world size 4"),
    ({"strategy": "fsdp", "tensor_parallel_size": 4}, "model.vocab_size=66 is not divisible"),
])
def test_invalid_parallel_settings_rejected(parallel, message):
    with pytest.raises(ConfigError, match=message):
        make_config(parallel, 4)
