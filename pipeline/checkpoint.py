"""Pretraining checkpoints: DeepSpeed's engine state plus the data loader's position, resumable on any world size.

Layout: `checkpoints/step-00001000/` holds DeepSpeed's files (model, optimizer, scheduler, loss scaler; ZeRO
shards per rank), `rank-00000.pt` … (each rank's loader state, the same global position on every rank; plain
types only, so they load with `weights_only=True`) and `meta.json` (step, world size, ZeRO stage and every
file's size and sha256), written last. `checkpoints/latest` names the newest complete checkpoint and is
replaced atomically after every rank has finished, so a crash while saving leaves the previous checkpoint in
charge.

On another number of ranks, optimizer state that ZeRO-1/2/3 partitioned by rank (`*_optim_states.pt`) is
resharded by DeepSpeed's universal checkpoint: rank 0 converts the checkpoint once with `ds_to_universal` into
`checkpoints/universal/<tag>/` (built under a temporary name and renamed) and every rank loads it with
`load_universal`. Unpartitioned state (ZeRO-0, fp32 or bf16) loads as it is.

Nothing in a checkpoint is ever unpickled beyond tensors and plain data: whoever can write the checkpoint can
rewrite its sha256 list too, so the hashes catch damage, not tampering. Every load goes through
`weights_only()`: torch's weights-only unpickler, forced even where DeepSpeed asks for `weights_only=False`,
with exactly the few DeepSpeed classes its checkpoints hold allowed. Before loading, `check()` also reads every
file's pickle opcodes (without running them) and refuses any other class, so all ranks refuse together.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
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
from pipeline.distributed import barrier, from_rank0
from pipeline.errors import BertpipeError

log = logging.getLogger(__name__)

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch honours it even over an explicit weights_only=False
_depth = 0  # how many weights_only() contexts are open


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
    global _depth
    if _depth:  # nested (DeepSpeed's engine loads through load_file inside an outer weights_only()): torch's
        yield   # safe_globals is a set, so an inner exit would remove the classes from the outer context too
        return
    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    _depth += 1
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        _depth -= 1
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
        kept = {p.name for p in self.root.glob("step-*")}
        for converted in self.root.glob("universal/*"):  # conversions are only needed until the next save
            if converted.name not in kept:
                shutil.rmtree(converted, ignore_errors=True)

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
        if meta["zero_stage"] != zero_stage:
            raise BertpipeError(f"checkpoint {tag} was written with ZeRO stage {meta['zero_stage']}, "
                                f"this run asks for stage {zero_stage}")
        return meta

    def needs_universal(self, meta: dict) -> bool:
        """Whether resuming `meta`'s checkpoint here must reshard optimizer state partitioned by rank."""
        return meta["world_size"] != self.world_size and any(name.endswith("_optim_states.pt")
                                                             for name in meta["files"])

    def universal(self, tag: str) -> Path:
        """DeepSpeed's universal checkpoint of `tag`, converted once by rank 0 (the only conversion call).

        The result is derived data: a conversion cut off leaves only `<tag>.incomplete`, redone next time."""
        out = self.root / "universal" / tag
        error = None
        if self.rank == 0 and not out.is_dir():
            from deepspeed.checkpoint import ds_to_universal

            partial = out.with_name(tag + ".incomplete")
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            args = argparse.Namespace(input_folder=str(self.root / tag), output_folder=str(partial),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)  # ZeRO-1/2 lack the version tag
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed), weights_only():
                    ds_to_universal.main(args)
                (partial.parent / "latest_universal").unlink(missing_ok=True)  # we load by tag
                os.replace(partial, out)
                log.info("converted %s to a universal checkpoint in %s", tag, out)
            except Exception as err:
                log.debug("ds_to_universal said:\n%s", printed.getvalue())
                error = (f"cannot convert checkpoint {self.root / tag} to DeepSpeed's universal format for "
                         f"{self.world_size} rank(s): {type(err).__name__}: {err}")
        error = from_rank0(error)  # the other ranks wait here and fail with rank 0
        if error:
            raise BertpipeError(error)
        return out

    def load(self, engine, tag: str, meta: dict) -> dict:
        """Restore the engine (model, optimizer, scheduler, loss scaler) and return the loader state.

        The engine must have been built with `"checkpoint": {"load_universal": true}` when
        needs_universal(meta)."""
        universal = self.needs_universal(meta)
        source = self.universal(tag).parent if universal else self.root
        groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
        own = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        _weights_only_engine(engine)
        try:
            with weights_only():
                path, client = engine.load_checkpoint(str(source), tag=tag)
        except BertpipeError:
            raise
        except pickle.UnpicklingError as err:
            raise refused(self.root / tag, err) from None
        except Exception as err:  # DeepSpeed raises many kinds on a damaged file
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}: {type(err).__name__}: {err}") from None
        if path is None:
            raise BertpipeError(f"cannot load checkpoint {self.root / tag}")
        if universal and meta["zero_stage"] == 3:
            # DeepSpeed 0.19's ZeRO-3 universal load (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
            # copies group 0's hyperparameters onto every group: put back those that differ by group (no
            # weight decay on biases and LayerNorm); and it gives every group one shared Adam step tensor,
            # which the optimizer then counts once per group and step: give each its own
            for group, before in zip(groups, own, strict=True):
                group.update({k: v for k, v in before.items() if any(o.get(k) != v for o in own)})
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        # the loader's position is global: every rank wrote the same; a rank new to the run reads rank 0's
        rank = self.rank if self.rank < meta["world_size"] else 0
        rank_file = self.root / tag / f"rank-{rank:05d}.pt"
        state = load_file(rank_file)
        return {**state, "step": client["step"]}

