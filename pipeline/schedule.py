"""The learning-rate schedule pretraining and fine-tuning share: linear warmup, then linear or polynomial decay."""

from __future__ import annotations


def warmup_decay(step: int, warmup: int, total: int, power: float = 1.0, floor: float = 0.0) -> float:
    """The lr factor at optimizer step `step` (from 0): linear from 1/warmup to 1 over `warmup` steps, then
    (1 - progress) ** power down to `floor` at `total` (power 1: BERT's linear decay; 0.5: the LAMB recipes')."""
    if step < warmup:
        return (step + 1) / warmup
    left = max(0.0, (total - step) / max(1, total - warmup))
    return floor + (1.0 - floor) * left**power
