"""The learning-rate schedule pretraining and fine-tuning share: linear warmup, then linear or polynomial decay."""

from __future__ import annotations


def warmup_decay(step: int, warmup: int, total: int, power: float = 1.0, floor: float = 0.0) -> float:
    """The lr factor at optimizer step `step` (from 0): linear from 1/warmup to 1 over `warmup` steps, then
    (1 - progress) ** power down to `floor` at `total` (power 1: BERT's linear decay; 0.5: the LAMB recipes')."""
    if step < warmup:
        return (step + 1) / warmup
    left = max(0.0, (total - step) / max(1, total - warmup))
    return floor + (1.0 - floor) * left**power


def warmup_poly(position: float, warmup: float, total: float, power: float = 1.0, floor: float = 0.0,
                from_start: bool = False) -> float:
    """The lr factor at a (possibly fractional) position of the schedule, the published recipes' way.

    Warmup: position / warmup, from 0. Then down to `floor` at `total`: (1 - position / total) ** power with
    `from_start` -- the decay counted from position 0, as google-research/bert's optimization.py (power 1) and
    NVIDIA's PolyWarmUpScheduler (power 0.5) do -- else ((total - position) / (total - warmup)) ** power from
    the end of warmup, as Izsak et al.'s time-based schedule does (positions in hours there).
    """
    if position < warmup:
        return position / warmup
    left = 1.0 - position / total if from_start else (total - position) / max(total - warmup, 1e-12)
    return floor + (1.0 - floor) * max(0.0, left) ** power
