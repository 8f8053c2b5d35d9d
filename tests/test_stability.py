"""Spike detectors, data-window skips and float16 loss scaling, without Ray."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from service.config import Config, DataSection, config_from_dict
from service.prepare import prepare_dataset
from workers.data import SampleOrder, TokenDataset, rank_micro_batches
from workers.model import ModelArgs, build_model
from workers.parallel import apply_fsdp
from workers.schedule import lr_multiplier
from workers.stability import DataSkips, DetectorSettings, DynamicLossScaler, SpikeAbort, SpikeMonitor
from workers.step import apply_update, compute_gradients
from workers.train_loop import build_optimizer, build_spike_monitor


def monitor(window: int = 5, policy: str = "rollback", max_events: int | None = None) -> SpikeMonitor:
    detectors = [
        DetectorSettings("loss_zscore", "loss", "zscore", 6.0, policy),
        DetectorSettings("grad_norm_ratio", "grad_norm", "median_ratio", 10.0, "skip"),
    ]
    return SpikeMonitor(detectors, window=window, nonfinite_policy="skip", max_events=max_events, event_window_steps=100)


def test_monitor_silent_until_window_full():
    spikes = monitor(window=5)
    decisions = [spikes.check(step, loss, 1.0) for step, loss in enumerate([3.0, 3.0, 300.0, 3.0], start=1)]
    assert [decision.action for decision in decisions] == ["step"] * 4


def test_monitor_flags_loss_spike_with_rollback():
    spikes = monitor(window=5)
    for step, loss in enumerate([3.0, 2.9, 3.1, 3.0, 2.95], start=1):
        assert spikes.check(step, loss, 1.0).action == "step"
    decision = spikes.check(6, 30.0, 1.0)
    assert decision.action == "rollback"
    assert [event.detector for event in decision.events] == ["loss_zscore"]
    assert decision.events[0].value == 30.0


def test_monitor_strongest_action_wins():
    spikes = monitor(window=5)
    for step in range(1, 6):
        spikes.check(step, 3.0 + 0.01 * step, 1.0 + 0.01 * step)
    decision = spikes.check(6, 60.0, 20.0)
    assert {event.detector for event in decision.events} == {"loss_zscore", "grad_norm_ratio"}
    assert decision.action == "rollback"


def test_monitor_flagged_value_not_added_to_window():
    spikes = monitor(window=5)
    for step in range(1, 6):
        spikes.check(step, 3.0, 1.0)
    spikes.check(6, 30.0, 1.0)
    assert 30.0 not in spikes.windows["loss"].values


def test_monitor_nonfinite_always_acts():
    spikes = monitor(window=50)
    decision = spikes.check(1, math.nan, 1.0)
    assert decision.action == "skip"
    assert decision.events[0].detector == "nonfinite"


def test_monitor_aborts_past_event_budget():
    spikes = monitor(window=3, policy="skip", max_events=2)
    for step in range(1, 4):
        spikes.check(step, 3.0, 1.0)
    spikes.check(4, 50.0, 1.0)
    spikes.check(5, 50.0, 1.0)
    with pytest.raises(SpikeAbort, match="stability.max_events=2") as raised:
        spikes.check(6, 50.0, 1.0)
    assert "step 4: loss_zscore" in str(raised.value)


def test_monitor_state_round_trip():
    spikes = monitor(window=5)
    for step in range(1, 6):
        spikes.check(step, 3.0 + step, 1.0)
    restored = monitor(window=5)
    restored.load_state_dict(spikes.state_dict())
    assert restored.check(6, 80.0, 1.0).action == spikes.check(6, 80.0, 1.0).action
    assert list(restored.windows["loss"].values) == list(spikes.windows["loss"].values)


def test_data_skips_map_steps_past_ranges():
    skips = DataSkips()
    assert [skips.batch_for_step(step) for step in (1, 20, 21)] == [1, 20, 21]
    skips.add(21, 7)
    assert [skips.batch_for_step(step) for step in (20, 21, 22)] == [20, 28, 29]


def test_data_skips_second_rollback_stacks():
    skips = DataSkips([(21, 7)])
    # A second rollback to checkpoint 20 starts its range where step 21 now reads.
    skips.add(skips.batch_for_step(21), 5)
    assert skips.batch_for_step(21) == 33
    assert skips.batch_for_step(20) == 20


def test_loss_scaler_backs_off_and_grows():
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=2)
    scaler.update(overflow=True)
    assert scaler.scale == 512.0
    scaler.update(overflow=False)
    scaler.update(overflow=False)
    assert scaler.scale == 1024.0


@pytest.fixture(scope="module")
def default_corpus_dataset(tmp_path_factory) -> str:
    storage = str(tmp_path_factory.mktemp("storage"))
    return prepare_dataset(DataSection(max_files=200), storage, {})


def test_default_thresholds_no_false_positives(default_corpus_dataset):
    """A normal run of a few hundred steps on the default corpus raises no stability event."""
    config: Config = config_from_dict({
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "seq_len": 64},
        "train": {"steps": 300, "global_batch": 8, "micro_batch": 8},
        "scaling": {"num_workers": 1},
    })
    torch.manual_seed(0)
    model = build_model(ModelArgs(**config.model.model_dump()), seed=config.run.seed)
    optimizer = build_optimizer(model, config)
    spikes = build_spike_monitor(config)
    dataset = TokenDataset(default_corpus_dataset, config.model.seq_len)
    order = SampleOrder(dataset.num_samples, config.run.seed)
    events = []
    for step in range(1, config.train.steps + 1):
        indices = order.global_batch(step, config.train.global_batch)
        batches = [dataset.micro_batch(chunk) for chunk in rank_micro_batches(indices, 0, 1, config.train.micro_batch)]
        gradients = compute_gradients(model, batches, device=torch.device("cpu"))
        decision = spikes.check(step, gradients.loss, gradients.grad_norm)
        events.extend(decision.events)
        multiplier = lr_multiplier(config.schedule.name, step, warmup_steps=config.schedule.warmup_steps,
                                   total_steps=config.train.steps, min_ratio=config.schedule.min_lr_ratio)
        apply_update(model, optimizer, gradients, lr=config.optim.lr * multiplier, grad_clip=config.train.grad_clip)
        optimizer.zero_grad(set_to_none=True)
    assert not events, f"false positives: {events}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_float16_overflow_skips_and_lowers_scale(single_rank_group):
    model = build_model(ModelArgs(n_layers=1, dim=32, n_heads=4, vocab_size=64, seq_len=16), seed=1)
    units = apply_fsdp(model, single_rank_group, param_dtype="float16", reduce_dtype="float32")
    config = config_from_dict({"scaling": {"num_workers": 1}, "train": {"global_batch": 4, "micro_batch": 4}})
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 17), generator=generator)
    from workers.data import MicroBatch

    batch = MicroBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], sample_indices=(0, 1))
    # 2**40 overflows float16 (max 65504) in the backward pass.
    scaler = DynamicLossScaler(init_scale=2.0**40, growth_interval=1000)
    before = [param.detach().full_tensor().clone() for param in model.parameters()]
    overflowed = 0
    for _ in range(40):
        gradients = compute_gradients(model, [batch], device=torch.device("cpu"), fsdp_units=units, loss_scale=scaler.scale)
        overflow = not math.isfinite(gradients.grad_norm)
        if overflow:
            overflowed += 1
            assert math.isfinite(gradients.loss), "the loss itself must stay finite: only the backward is scaled"
        else:
            apply_update(model, optimizer, gradients, lr=1e-3, grad_clip=1.0, loss_scale=scaler.scale)
        optimizer.zero_grad(set_to_none=True)
        scaler.update(overflow)
        if not overflow:
            break
    assert overflowed >= 1
    assert scaler.scale < 2.0**40
    after = [param.detach().full_tensor() for param in model.parameters()]
    assert any(not torch.equal(old, new) for old, new in zip(before, after)), "the first step without overflow must update"
