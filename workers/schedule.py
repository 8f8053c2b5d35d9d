"""Learning-rate schedules as pure functions of the optimizer step.

A pure function of the step means a run resumed at any step sets exactly the LR
the uninterrupted run had there; no scheduler state is saved. Steps are 1-based:
step 1 is the first optimizer step.
"""

from __future__ import annotations

import math

SCHEDULE_NAMES = ("cosine", "wsd", "constant")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float, **unused: object) -> float:
    """Return the LR multiplier: linear warmup to 1.0 at ``warmup_steps``, then cosine decay to ``min_ratio``.

    With warmup 100, total 1000 and min ratio 0.1: 1.0 at step 100, 0.55 at step 550, 0.1 at step 1000.
    """
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return _decay(min(1.0, (step - warmup_steps) / decay_steps), min_ratio, "cosine")


def _decay(progress: float, min_ratio: float, shape: str) -> float:
    """Return the multiplier at ``progress`` in [0, 1] of a decay from 1.0 to ``min_ratio``."""
    if progress >= 1.0:
        # Return the floor exactly; cos(pi) is -1 only up to rounding.
        return min_ratio
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, *, warmup_steps: int, total_steps: int, min_ratio: float, decay_ratio: float = 0.2, decay_shape: str = "cosine"
) -> float:
    """Return the LR multiplier of warmup-stable-decay (WSD).

    Linear warmup to 1.0, constant 1.0, then a decay to ``min_ratio`` over the
    last ``decay_ratio x total_steps`` steps (rounded to whole steps).
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, round(decay_ratio * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step <= decay_start:
        return 1.0
    return _decay((step - decay_start) / (total_steps - decay_start), min_ratio, decay_shape)


def constant(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float, **unused: object) -> float:
    """Return the LR multiplier: linear warmup, then 1.0 to the end."""
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    return 1.0


_SCHEDULES = {"cosine": warmup_cosine, "wsd": warmup_stable_decay, "constant": constant}


def lr_multiplier(
    name: str, step: int, *, warmup_steps: int, total_steps: int, min_ratio: float,
    decay_ratio: float = 0.2, decay_shape: str = "cosine",
) -> float:
    """Return the LR multiplier of schedule ``name`` at optimizer step ``step`` (1-based)."""
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    return _SCHEDULES[name](
        step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio,
        decay_ratio=decay_ratio, decay_shape=decay_shape,
    )
