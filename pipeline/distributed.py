"""Process-group setup for every launcher: torchrun, the deepspeed launcher, srun, or a single process.

Ranks come from torch's variables (RANK, WORLD_SIZE, LOCAL_RANK) when a launcher set them, else from
SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) under srun, else this is rank 0 of 1; the node index from
torchrun's GROUP_RANK or SLURM_NODEID. Under srun the rendezvous is the first node of the allocation, by its
NodeAddr (what slurmd listens on, which may differ from its name). The backend is NCCL on GPUs and gloo on
the CPU (GLOO_SOCKET_IFNAME picks its interface where the hostname does not resolve to the right one).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import BertpipeError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    node: int = 0  # index of this rank's node among the job's nodes

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    """The address of the allocation's first node: its NodeAddr in slurm.conf, else its name."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        first = out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return first
    fields = dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)
    return fields.get("NodeAddr") or first


def init_distributed() -> Dist:
    """Fill in the rendezvous variables a launcher did not set, then start DeepSpeed's process group."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    local_rank = int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    node = int(env.get("GROUP_RANK") or env.get("SLURM_NODEID") or 0)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, node)


def placement(d: Dist) -> list[dict]:
    """Where every rank runs (rank, local rank, node, host), gathered from all ranks: the run's layout."""
    me = {"rank": d.rank, "local_rank": d.local_rank, "node": d.node, "host": socket.gethostname()}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [me]
    every: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, me)
    return every


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over ranks (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of each value over ranks (one small all-reduce, in float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank: how ranks agree to stop together."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def from_rank0(value):
    """Rank 0's `value` on every rank (a small picklable object, such as an error message or None)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it raises BertpipeError on any rank, every rank raises the error of the lowest
    such rank, marked `every_rank` so that only rank 0 prints it. Every rank must call this at the same point."""
    error: BertpipeError | None = None
    result = None
    try:
        result = fn()
    except BertpipeError as err:
        error = err
    found = (str(error), error.exit_code) if error is not None else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, found)
        found = next((e for e in everyone if e is not None), None)
    if found is not None:
        agreed = BertpipeError(found[0])
        agreed.exit_code = found[1]
        agreed.every_rank = True
        raise agreed
    return result  # type: ignore[return-value]


def _torchrun_agent() -> int | None:
    """The pid of the torchrun agent that launched this process, if it did."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    import psutil

    parent = os.getppid()
    try:
        cmdline = " ".join(psutil.Process(parent).cmdline()[:3])
    except psutil.Error:
        return None
    return parent if any(name in cmdline for name in ("torchrun", "torch.distributed.run")) else None


def exit_together(code: int) -> None:
    """End every rank after an error they all agreed on (`agree`), once rank 0 has printed it.

    torchrun's agent answers any worker that exits non-zero with its own ChildFailedError traceback, so under
    torchrun each node's local rank 0 ends the agent first (SIGKILL, which leaves nothing on stderr; the
    command's exit status is then 137) and every rank exits without the process group's teardown messages.
    Elsewhere (one process, srun, the deepspeed launcher) ranks simply return `code`."""
    sys.stdout.flush()
    sys.stderr.flush()
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if multi:
        dist.barrier()  # rank 0 has printed the line
    agent = _torchrun_agent()
    if agent is None:
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.getppid() == agent and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(code)
