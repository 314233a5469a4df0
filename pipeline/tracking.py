"""Metrics to a local `metrics.jsonl` and to Weights & Biases, from rank 0 only.

The JSONL file is the record tests, plots and the leaderboard read (W&B's offline `.wandb` file has no
public reader); W&B is offline by default and uploads later with `wandb sync RUN_DIR/wandb/offline-run-*`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
_SECRET = re.compile(r"key|token|secret|password", re.I)


@dataclass
class TrackConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "bertpipe"
    entity: str | None = None
    group: str | None = None
    run_name: str | None = None  # default: the run directory's name
    log_every: int = 10  # steps between metric lines

    def __post_init__(self) -> None:
        if self.wandb not in ("offline", "online", "disabled"):
            raise ValueError(f"track.wandb must be offline, online or disabled, not {self.wandb!r}")


def without_secrets(obj):
    """The config as logged: any key that looks like a credential is redacted."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) and v else without_secrets(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_secrets(v) for v in obj]
    return obj


class Tracker:
    """`log(metrics, step)` fans out to the JSONL file and W&B; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path, cfg: TrackConfig, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        if cfg.wandb != "disabled":
            import wandb

            id_file = Path(run_dir) / "wandb_id.txt"  # one W&B run across resumes of the same run directory
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
            os.environ.setdefault("WANDB_SILENT", "true")
            try:
                self.run = wandb.init(
                    mode=cfg.wandb, dir=str(run_dir), project=cfg.project, entity=cfg.entity, group=cfg.group,
                    name=cfg.run_name or Path(run_dir).name, id=run_id, resume="allow",
                    config=without_secrets(config),
                )
            except Exception as err:  # tracking must never stop a training run: metrics.jsonl still has it all
                log.warning("W&B did not start (%s: %s); metrics go to %s only", type(err).__name__, err, self.path)

    def log(self, metrics: dict, step: int, event: str = "train", wandb_prefix: str | None = None,
            wandb_step: int | None = None) -> None:
        """One line `{"event", "step", "time", **metrics}`; W&B gets the numbers as `<prefix or event>/<key>`
        at `wandb_step` (default `step`; W&B's steps only grow, so a late result is logged at the current one)."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.run is not None:
            prefix = wandb_prefix or event
            numeric = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
            self.run.log(numeric, step=step if wandb_step is None else wandb_step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def trim_metrics(run_dir: str | Path, step: int) -> int:
    """Drop the lines of metrics.jsonl after `step` (a resumed run logs those steps again; a fresh start, step
    0, keeps none), and any line a kill cut short. Returns how many lines were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if step > 0 and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
