"""The learning-rate schedule shared by the codec trainer and distillation (compress.distill)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Factor on the base learning rate at `step` (0-based) of `total`: (step + 1) / warmup
    over the first `warmup` steps, then a half cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
