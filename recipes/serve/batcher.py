"""Dynamic batching: inputs from concurrent requests answered together, each result back to its own request.

Requests put their inputs on one queue; one worker thread takes up to `max_batch` of them at a time and runs
the model on them (torch releases the GIL, so the event loop keeps reading requests meanwhile). The unit is an
input, not a request: a request of 50 texts and three of one text share batches, and `max_batch` bounds the
forward pass itself.

The worker takes whatever is queued when it is free. It waits for more — at most `max_wait_ms` after the oldest
input in the batch arrived — only while the batch has room and `should_wait()` says more are likely to come
(the server: its clients have lately sent overlapping requests). A lone client's request is never held back,
so batching costs it nothing; concurrent clients' requests, which come back in waves after each batch, are
gathered into one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs `answer(values) -> results` (one result per value, in order) on batches gathered from `submit`."""

    def __init__(self, answer: Callable[[list], list], max_batch: int = 32, max_wait_ms: float = 5.0,
                 should_wait: Callable[[], bool] = lambda: True,
                 on_batch: Callable[[int, float], None] = lambda size, seconds: None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and max_wait_ms at least 0")
        self.answer, self.max_batch, self.max_wait = answer, max_batch, max_wait_ms / 1000
        self.should_wait, self.on_batch = should_wait, on_batch
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="bertpipe-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in hand and stop the worker; inputs still queued get an error."""
        self._queue.put(None)
        self._thread.join()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _hand_back([item], [RuntimeError("the server is shutting down")], failed=True)

    async def submit(self, values: list) -> list:
        """The results of `values`, in order, once every one of them has been through a batch."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in values]
        for value, future in zip(values, futures, strict=True):
            self._queue.put(_Item(value, future, loop))
        return list(await asyncio.gather(*futures))

    def _collect(self) -> list[_Item] | None:
        """The next batch: the oldest input and what follows it, waiting for more only if should_wait()."""
        first = self._queue.get()
        if first is None:
            return None
        batch, deadline = [first], first.arrived + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.should_wait():
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:  # stop after this batch
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _work(self) -> None:
        while (batch := self._collect()) is not None:
            start = time.perf_counter()
            try:
                results = self.answer([item.value for item in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as err:  # the batch's requests fail; the server keeps serving
                log.exception("a batch of %d inputs failed", len(batch))
                _hand_back(batch, [err] * len(batch), failed=True)
                continue
            self.on_batch(len(batch), time.perf_counter() - start)
            _hand_back(batch, results)


def _hand_back(batch: list[_Item], outcomes: list, failed: bool = False) -> None:
    """Each outcome to its input's future, in one call per event loop (one wake-up, not one per input)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for item, outcome in zip(batch, outcomes, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, outcome))
    for loop, pairs in by_loop.items():
        loop.call_soon_threadsafe(_fail if failed else _resolve, pairs)


def _resolve(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in pairs:
        if not future.done():  # a request whose client went away was cancelled
            future.set_result(result)


def _fail(pairs: list[tuple[asyncio.Future, BaseException]]) -> None:
    for future, err in pairs:
        if not future.done():
            future.set_exception(err)
