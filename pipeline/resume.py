"""What a resumed pretraining run may change in its config, checked before anything is written.

Resume is exact: the same batches, masks, dropout and optimizer trajectory as a run that never stopped. A key
that shapes those (batch sizes, loader workers, seed, shuffle buffer, shards, masking, the model, ZeRO stage,
precision, the optimizer's betas, eps, weight decay and clipping, which DeepSpeed restores from the checkpoint)
cannot change on resume: the run is refused, naming the keys. The keys in APPLIED take effect from the resumed
step on — the LR schedule is rebuilt from the new values — and every change is recorded. A key in neither
list (one added later) is refused, so no change is ever silently ignored.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import BertpipeError

# key (or "prefix.") -> how the new value takes effect after a resume
APPLIED = {
    "max_steps": "the loop and the LR schedule run to the new max_steps",
    "optim.lr": "the scheduler's base LR, from the resumed step on",
    "optim.warmup_steps": "the LR schedule, from the resumed step on",
    "optim.schedule": "the LR schedule, from the resumed step on",
    "optim.power": "the LR schedule, from the resumed step on",
    "optim.min_lr": "the LR schedule, from the resumed step on",
    "eval_every": "evaluation cadence",
    "eval_batches": "evaluation size",
    "checkpoint_every": "checkpoint cadence",
    "keep_checkpoints": "how many checkpoints are kept",
    "peak_tflops": "the MFU figure",
    "export": "whether the run ends with an HF export",
    "model.gradient_checkpointing": "recomputation only: same results",
    "model.compile": "compilation only: same results",
    "track.": "tracking",
}
# paths whose content, not spelling, must stay the same: compared by hash (the shards' and vocabulary's)
BY_CONTENT = ("run_dir", "data.shards", "data.vocab_dir")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def applied(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in APPLIED)


def config_changes(recorded: dict, new: dict, defaults: dict) -> dict[str, tuple[Any, Any]]:
    """key -> (recorded value, new value) for every leaf that differs; keys missing from the recorded config
    (written before they existed) count at their default."""
    old = flatten(defaults) | flatten(recorded)
    now = flatten(new)
    return {k: (old.get(k), now.get(k)) for k in sorted(old.keys() | now.keys())
            if k not in BY_CONTENT and old.get(k) != now.get(k)}


def check_resumable(changes: dict[str, tuple[Any, Any]], run_dir: str) -> dict[str, tuple[Any, Any]]:
    """The changes a resume applies; raises naming the keys that would break an exact resume."""
    fixed = {k: v for k, v in changes.items() if not applied(k)}
    if fixed:
        listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
        raise BertpipeError(f"cannot resume {run_dir} with a changed {listed}: the resumed run would not continue "
                            "the same run exactly; restore the value, or start a new run_dir (model.init_from="
                            f"{run_dir} starts from its weights)")
    return changes
