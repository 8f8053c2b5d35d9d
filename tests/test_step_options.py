"""Step options that change speed and must not change results: AdamW kernels and torch.compile."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from service.config import ConfigError, config_from_dict
from workers.checkpoint import OPTIMIZER_KERNEL_KEYS, keep_optimizer_kernels
from workers.data import MicroBatch
from workers.model import build_model
from workers.parallel import build_device_mesh, parallelize
from workers.step import apply_update, compute_gradients
from workers.train_loop import adamw_kernels, build_optimizer, model_args

MODEL = {"n_layers": 2, "dim": 32, "n_heads": 4, "vocab_size": 64, "seq_len": 16}
CPU = torch.device("cpu")


def make_config(**optim: object) -> object:
    return config_from_dict({"model": MODEL, "scaling": {"num_workers": 1}, "optim": optim,
                             "train": {"global_batch": 2, "micro_batch": 2}})


def random_batch(step: int) -> MicroBatch:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"] + 1), generator=generator)
    return MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=(0, 1))


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, units: list = ()) -> list[float]:
    losses = []
    for step in steps:
        gradients = compute_gradients(model, [random_batch(step)], device=CPU, fsdp_units=units)
        apply_update(model, optimizer, gradients, lr=1e-2, grad_clip=1.0)
        optimizer.zero_grad(set_to_none=True)
        losses.append(gradients.loss)
    return losses


@pytest.fixture
def single_rank_group() -> Iterator[None]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("implementation", "device_type", "expected"), [
    ("auto", "cuda", {"fused": True, "foreach": None}),
    ("auto", "cpu", {"fused": None, "foreach": True}),
    ("fused", "cpu", {"fused": True, "foreach": None}),
    ("foreach", "cuda", {"fused": None, "foreach": True}),
])
def test_adamw_kernels(implementation: str, device_type: str, expected: dict):
    assert adamw_kernels(implementation, device_type) == expected


def test_unknown_implementation_rejected():
    with pytest.raises(ConfigError, match="optim.implementation"):
        make_config(implementation="apex")


def test_fused_and_foreach_adamw_agree():
    losses = {}
    for implementation in ("foreach", "fused"):
        model = build_model(model_args(make_config()), seed=3)
        optimizer = build_optimizer(model, make_config(implementation=implementation))
        losses[implementation] = train(model, optimizer, range(1, 6))
    assert losses["fused"] == pytest.approx(losses["foreach"], rel=1e-5)


def test_load_keeps_this_runs_kernels():
    # A checkpoint written with foreach kernels, loaded by a run that chose fused ones.
    saved_model = build_model(model_args(make_config()), seed=3)
    saved_optimizer = build_optimizer(saved_model, make_config(implementation="foreach"))
    train(saved_model, saved_optimizer, range(1, 3))
    # Copies: the state dicts share storage with the live model and optimizer.
    model_state, optimizer_state = copy.deepcopy(get_state_dict(saved_model, saved_optimizer))
    expected = train(saved_model, saved_optimizer, range(3, 5))

    model = build_model(model_args(make_config()), seed=3)
    optimizer = build_optimizer(model, make_config(implementation="fused"))
    kernels = [{key: group.get(key) for key in OPTIMIZER_KERNEL_KEYS} for group in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    assert optimizer.param_groups[0]["foreach"] is True, "the load no longer copies the saved kernels; drop the fix"
    keep_optimizer_kernels(optimizer, kernels)

    assert [group["fused"] for group in optimizer.param_groups] == [True, True]
    assert [group["foreach"] for group in optimizer.param_groups] == [None, None]
    assert train(model, optimizer, range(3, 5)) == pytest.approx(expected, rel=1e-5)


def test_compiled_blocks_match_eager(single_rank_group: None):
    config = make_config()
    mesh = build_device_mesh("cpu", 1, config.parallel)
    losses = {}
    names = {}
    for compiled in (False, True):
        model = build_model(model_args(config), seed=3)
        parallel = parallelize(model, config.parallel, mesh, compile_blocks=compiled)
        optimizer = build_optimizer(parallel.module, config, parallel)
        losses[compiled] = train(parallel.module, optimizer, range(1, 4), parallel.sync_units)
        names[compiled] = sorted(parallel.module.state_dict())

    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    # Checkpoints of compiled and eager runs use the same parameter names.
    assert names[True] == names[False]
