"""Pretraining checkpoints: DeepSpeed's engine state plus each rank's RNG and data-loader state.

Layout: `checkpoints/step-00001000/` holds DeepSpeed's files (model, optimizer, scheduler, loss scaler; ZeRO
shards per rank), `rank-00000.pt` … (torch RNG states and the loader position, tensors and plain types only,
so they load with `weights_only=True`) and `meta.json` (step, world size, ZeRO stage and every file's size and
sha256), written last. `checkpoints/latest` names the newest complete checkpoint and is replaced atomically
after every rank has finished, so a crash while saving leaves the previous checkpoint in charge.

Nothing in a checkpoint is ever unpickled beyond tensors and plain data: whoever can write the checkpoint can
rewrite its sha256 list too, so the hashes catch damage, not tampering. Every load goes through
`weights_only()`: torch's weights-only unpickler, forced even where DeepSpeed asks for `weights_only=False`,
with exactly the few DeepSpeed classes its checkpoints hold allowed. Before loading, `check()` also reads every
file's pickle opcodes (without running them) and refuses any other class, so all ranks refuse together.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pipeline.artifacts import write_json
from pipeline.distributed import barrier
from pipeline.errors import BertpipeError

log = logging.getLogger(__name__)

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch honours it even over an explicit weights_only=False


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles beside tensors and plain containers: plain records of numbers, found by
    loading its checkpoints of ZeRO stages 0-3 in fp32 and bf16 (fp16 adds the dynamic loss scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Every torch.load inside is weights-only, whatever its caller passes, with DeepSpeed's few classes
    allowed: the one place through which every checkpoint load goes."""
    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = saved


def refused(path: Path | str, err: Exception) -> BertpipeError:
    """The one line for a checkpoint file the weights-only unpickler would not load."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    what = f"a pickled {found.group(1)}" if found else "pickled objects"
    return BertpipeError(f"refusing to load {path}: it holds {what}, not only tensors and plain data "
                         "(checkpoints are loaded weights-only, since unpickling anything else can run code)")


def load_file(path: Path | str, map_location="cpu"):
    """torch.load of one checkpoint file, weights-only; a file it refuses or cannot read is one line."""
    with weights_only():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise refused(path, err) from None
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            raise BertpipeError(f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def scan(path: Path) -> None:
    """Refuse a checkpoint file whose pickle names any class the weights-only unpickler would not load (read
    from its opcodes: nothing runs), so every rank can refuse before any of them loads it."""
    if not zipfile.is_zipfile(path):  # torch's legacy format: left to the weights-only load itself
        return
    with weights_only():
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as err:  # a damaged archive
            raise BertpipeError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if unsafe:
        raise refused(path, ValueError(f"GLOBAL {unsafe[0]}"))


def _weights_only_engine(engine) -> None:
    """Make DeepSpeed's checkpoint engine load weights-only (its TorchCheckpointEngine passes weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_file(path, map_location)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine


def refuse_other_world_size(meta: dict, tag: str, world_size: int) -> None:
    """Resuming on another world size is refused: ZeRO partitions the optimizer by rank and the loader's
    streams are per rank. (The one place to relax once checkpoints can be resharded.)"""
    if meta["world_size"] != world_size:
        raise BertpipeError(
            f"checkpoint {tag} was written by {meta['world_size']} rank(s) with ZeRO stage {meta['zero_stage']}; "
            f"this run has {world_size}. ZeRO partitions the optimizer state by rank and the data loader's "
            "streams are per rank, so resume with the same world size (or start a new run with "
            "model.init_from pointing at this run)"
        )


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
            if self.rank == 0 and path.suffix == ".pt":
                scan(path)
        refuse_other_world_size(meta, tag, world_size)
        if meta["zero_stage"] != zero_stage:
            raise BertpipeError(f"checkpoint {tag} was written with ZeRO stage {meta['zero_stage']}, "
                                f"this run asks for stage {zero_stage}")
        return meta

    def load(self, engine, tag: str) -> dict:
        """Restore the engine (model, optimizer, scheduler, loss scaler) and return this rank's own state."""
        _weights_only_engine(engine)
        try:
            with weights_only():
                path, client = engine.load_checkpoint(str(self.root), tag=tag)
        except BertpipeError:
            raise
        except pickle.UnpicklingError as err:
            raise refused(self.root / tag, err) from None
        except Exception as err:  # DeepSpeed raises many kinds on a damaged file
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}: {type(err).__name__}: {err}") from None
        if path is None:
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}")
        state = load_file(self.root / tag / f"rank-{self.rank:05d}.pt")
        return {**state, "step": client["step"]}

