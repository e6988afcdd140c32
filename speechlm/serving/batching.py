"""Dynamic batching: requests that arrive together run on the model together.

A request waits at most `max_wait_s` for company; then everything queued (up
to `max_batch`) goes to the model as one batch, on one worker thread (the
model is never run by two threads at once). While a batch runs, new requests
queue, so under load each batch is as full as the traffic allows and
throughput grows with the number of clients.

Isolation: a batch whose call raises is retried one item at a time, so an item
that breaks the model fails alone; a caller that went away (its future was
cancelled) is dropped before its batch starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class DynamicBatcher:
    """`await batcher.submit(item)` returns `run_batch([...item...])`'s answer for it.

    run_batch(items) -> answers, one per item, in order; it runs on the worker thread.
    """

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *,
                 max_batch: int = 16, max_wait_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speechlm-model")

    async def submit(self, item) -> Any:
        if self._worker is None:  # started by the first request, on the server's loop
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():  # already waiting: no reason to sleep
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(item, future) for item, future in batch if not future.done()]
            if not live:
                continue
            outcomes = await loop.run_in_executor(self._pool, self._run, [i for i, _ in live])
            self.stats.requests += len(live)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(live))
            for (_, future), (ok, value) in zip(live, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _run(self, items: list) -> list[tuple[bool, Any]]:
        """(True, answer) or (False, exception) per item."""
        try:
            return [(True, answer) for answer in self._checked(items)]
        except Exception as e:  # noqa: BLE001 - find the item that breaks the batch
            if len(items) == 1:
                logger.exception("a request failed on the model")
                return [(False, e)]
            logger.warning("a batch of %d failed; running its items one at a time", len(items))
        return [self._run([item])[0] for item in items]

    def _checked(self, items: list) -> list:
        answers = list(self.run_batch(items))
        if len(answers) != len(items):
            raise RuntimeError(f"run_batch returned {len(answers)} answers for {len(items)} items")
        return answers
