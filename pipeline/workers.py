"""Loader workers that leave SLURM's signals to the training process, and still end when it does.

SLURM signals every process of a job: USR1 before the time limit, TERM on preemption or scancel. A worker
killed by either makes the training process raise "DataLoader worker ... killed by signal" before it can
checkpoint, so workers ignore both and the training process decides (it checkpoints, then ends them itself).
Two gaps come with that, and `SignalSafeLoader` closes both:
- a signal that arrives while an epoch's workers start, before they ignore it, would still kill one: the
  signals stay blocked from the fork until the worker ignores them;
- multiprocessing ends the workers still alive at exit (an iterator kept alive by a traceback, say) with TERM
  and then waits for them, forever, since they ignore it: they are killed at exit instead.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections.abc import Iterator
from multiprocessing.process import BaseProcess

from torch.utils.data import DataLoader

SLURM_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_workers: weakref.WeakKeyDictionary[BaseProcess, int] = weakref.WeakKeyDictionary()  # worker -> its parent


def leave_signals_to_the_trainer(_worker: int) -> None:
    """A worker's first step: ignore SLURM's signals, then take the ones blocked since the fork (and drop them)."""
    for sig in SLURM_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SLURM_SIGNALS)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers leave SLURM's signals to the training process from the moment they fork."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("worker_init_fn", leave_signals_to_the_trainer)
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator:
        if self.num_workers == 0 or self.worker_init_fn is not leave_signals_to_the_trainer:
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, SLURM_SIGNALS)  # the workers fork with it
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        _workers.update(dict.fromkeys(getattr(batches, "_workers", ()), os.getpid()))
        return batches


@atexit.register  # registered after multiprocessing's own exit hook (torch imports it), so it runs first
def _kill_workers_left_at_exit() -> None:
    for worker, parent in list(_workers.items()):
        if parent == os.getpid() and worker.is_alive():
            worker.kill()
