"""Dynamic micro-batching: concurrent requests' images run through the engine together.

One worker task takes the first waiting request, then keeps taking more until the batch holds `max_batch`
images or `max_wait_ms` has passed, runs the batch on a single inference thread (off the event loop), and
hands each request its rows. A request whose images would overflow the batch waits for the next one. The
queue is bounded in images: past `max_queue` the submit fails at once (the route answers 503) instead of
letting latency grow without bound. Requests that gave up (timed out) are skipped, not computed.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .metrics import Metrics


class EngineStopped(RuntimeError):
    """The worker that runs batches is gone; liveness fails until the process is restarted."""


class Overloaded(RuntimeError):
    """The queue is full; retry later."""


@dataclass
class _Job:
    images: np.ndarray  # [n, 3, S, S]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int,
                 metrics: Metrics) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.queued_images = 0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    @property
    def alive(self) -> bool:
        """Whether the worker that runs batches is still running (liveness reports it)."""
        return self._worker is not None and not self._worker.done()

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Features for `images`, computed in some batch; raises Overloaded when the queue is full."""
        if not self.alive:
            raise EngineStopped("the inference worker has stopped; the server needs a restart")
        if self.queued_images + len(images) > self.max_queue:
            raise Overloaded(f"{self.queued_images} images are already waiting (limit {self.max_queue})")
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._add_queued(len(images))
        self._queue.put_nowait(job)
        return await job.future

    def _add_queued(self, count: int) -> None:
        self.queued_images += count
        self.metrics.queue_depth.set(self.queued_images)

    async def _next_job(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0 and self._queue.empty():
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), max(timeout, 0))
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[_Job]:
        first = await self._next_job(None)
        jobs, count = [first], len(first.images)
        deadline = time.perf_counter() + self.max_wait
        while count < self.max_batch:
            job = await self._next_job(deadline - time.perf_counter())
            if job is None:
                break
            if count + len(job.images) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            live = [job for job in jobs if not job.future.done()]
            try:
                if live:
                    batch = np.concatenate([job.images for job in live])
                    started = time.perf_counter()
                    features = await loop.run_in_executor(self._executor, self._run_in_pieces, batch)
                    self.metrics.batch_size.observe(len(batch))
                    self.metrics.inference_seconds.observe(time.perf_counter() - started)
                    offset = 0
                    for job in live:
                        rows = features[offset : offset + len(job.images)]
                        offset += len(job.images)
                        if not job.future.done():
                            job.future.set_result(rows)
            except Exception as err:  # the engine failed: every request of this batch learns why
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
            finally:
                self._add_queued(-sum(len(job.images) for job in jobs))

    def _run_in_pieces(self, batch: np.ndarray) -> np.ndarray:
        """A single request may hold more images than the batch limit; run it in limit-sized pieces."""
        return np.concatenate([self.run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)])
