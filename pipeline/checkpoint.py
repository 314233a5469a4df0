"""Pretraining checkpoints: DeepSpeed's engine state plus each rank's RNG and data-loader state.

Layout: `checkpoints/step-00001000/` holds DeepSpeed's files (model, optimizer, scheduler, loss scaler; ZeRO
shards per rank), `rank-00000.pt` … (torch RNG states and the loader position, tensors and plain types only,
so they load with `weights_only=True`) and `meta.json` (step, world size, ZeRO stage and every file's size and
sha256), written last. `checkpoints/latest` names the newest complete checkpoint and is replaced atomically
after every rank has finished, so a crash while saving leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.artifacts import write_json
from pipeline.distributed import barrier
from pipeline.errors import BertpipeError

log = logging.getLogger(__name__)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def latest(self) -> str | None:
        path = self.root / "latest"
        return path.read_text().strip() if path.exists() else None

    def save(self, engine, step: int, rank_state: dict, meta: dict) -> str:
        """Every rank calls this at the same step; returns the tag."""
        tag = f"step-{step:08d}"
        directory = self.root / tag
        if self.rank == 0 and directory.exists():  # left over from a crash while saving: start clean
            shutil.rmtree(directory)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, directory / f"rank-{self.rank:05d}.pt")
        barrier()
        if self.rank == 0:
            files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _digest(p)}
                     for p in sorted(directory.rglob("*")) if p.is_file()}
            write_json(directory / "meta.json", {**meta, "step": step, "world_size": self.world_size,
                                                 "files": files})
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / "latest")
            self._prune(tag)
        barrier()
        return tag

    def _prune(self, newest: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step-*") if p.is_dir())
        for tag in tags[: max(0, len(tags) - self.keep)]:
            if tag != newest:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def check(self, tag: str, world_size: int, zero_stage: int) -> dict:
        """The meta of checkpoint `tag`, after checking its files and that this run can resume from it."""
        directory = self.root / tag
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise BertpipeError(f"checkpoint {directory} is incomplete (no meta.json): it was cut off while saving")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise BertpipeError(f"checkpoint {directory} has an unreadable meta.json") from None
        for name, info in meta["files"].items():
            path = directory / name
            if not path.exists() or path.stat().st_size != info["bytes"]:
                raise BertpipeError(f"checkpoint {directory} is truncated or incomplete: {name} "
                                    f"is missing or not {info['bytes']} bytes")
            if self.rank == 0 and _digest(path) != info["sha256"]:
                raise BertpipeError(f"checkpoint {directory} is corrupt: {name} does not match its sha256")
        if meta["world_size"] != world_size:
            raise BertpipeError(
                f"checkpoint {tag} was written by {meta['world_size']} rank(s) with ZeRO stage {meta['zero_stage']}; "
                f"this run has {world_size}. ZeRO partitions the optimizer state by rank and the data loader's "
                "streams are per rank, so resume with the same world size (or start a new run with "
                "model.init_from pointing at this run)"
            )
        if meta["zero_stage"] != zero_stage:
            raise BertpipeError(f"checkpoint {tag} was written with ZeRO stage {meta['zero_stage']}, "
                                f"this run asks for stage {zero_stage}")
        return meta

    def load(self, engine, tag: str) -> dict:
        """Restore the engine (model, optimizer, scheduler, loss scaler) and return this rank's own state."""
        try:
            path, client = engine.load_checkpoint(str(self.root), tag=tag)
        except Exception as err:  # DeepSpeed raises many kinds on a damaged file
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}: {type(err).__name__}: {err}") from None
        if path is None:
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}")
        rank_file = self.root / tag / f"rank-{self.rank:05d}.pt"
        try:
            state = torch.load(rank_file, weights_only=True)
        except Exception as err:
            raise BertpipeError(f"cannot load {rank_file}: {type(err).__name__}: {err}") from None
        return {**state, "step": client["step"]}
