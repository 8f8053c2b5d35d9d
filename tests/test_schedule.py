"""Learning-rate schedules: exact values at the corners, monotone phases, invalid steps."""

from __future__ import annotations

import pytest

from workers.schedule import SCHEDULE_NAMES, constant, lr_multiplier, warmup_cosine

COSINE = {"warmup_steps": 100, "total_steps": 1000, "min_ratio": 0.1}


def cosine(step: int) -> float:
    return lr_multiplier("cosine", step, **COSINE)


def test_cosine_peak_at_warmup_end():
    assert cosine(100) == 1.0


def test_cosine_midpoint_of_decay():
    assert cosine(550) == pytest.approx(0.55, abs=1e-12, rel=0)


def test_cosine_floor_at_last_step():
    assert cosine(1000) == 0.1


def test_cosine_stays_at_floor_after_last_step():
    assert cosine(1001) == 0.1
    assert cosine(5000) == 0.1


def test_cosine_warmup_is_linear():
    assert cosine(1) == pytest.approx(0.01, abs=1e-15)
    assert cosine(50) == pytest.approx(0.5, abs=1e-15)


def test_cosine_warmup_increases():
    values = [cosine(step) for step in range(1, 101)]

    assert all(earlier < later for earlier, later in zip(values, values[1:]))


def test_cosine_decay_decreases():
    values = [cosine(step) for step in range(100, 1001)]

    assert all(earlier > later for earlier, later in zip(values, values[1:]))
    assert min(values) == 0.1


def test_cosine_without_warmup_starts_near_peak():
    value = warmup_cosine(1, warmup_steps=0, total_steps=1000, min_ratio=0.0)

    assert 0.999 < value < 1.0


def test_cosine_warmup_over_whole_run():
    assert warmup_cosine(10, warmup_steps=10, total_steps=10, min_ratio=0.1) == 1.0


def test_constant_warmup_then_flat():
    values = [lr_multiplier("constant", step, **COSINE) for step in (1, 50, 100, 101, 550, 1000, 2000)]

    assert values == [0.01, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_constant_without_warmup_is_one():
    assert constant(1, warmup_steps=0, total_steps=10, min_ratio=0.1) == 1.0


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("step", [0, -1])
def test_step_below_one_rejected(name: str, step: int):
    with pytest.raises(ValueError, match=f"step must be at least 1, got {step}"):
        lr_multiplier(name, step, **COSINE)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_depends_only_on_step(name: str):
    # A resumed run has no scheduler state, so a repeated call must give the same value.
    first = [lr_multiplier(name, step, **COSINE) for step in range(1, 1001, 37)]
    second = [lr_multiplier(name, step, **COSINE) for step in range(1, 1001, 37)]

    assert first == second
