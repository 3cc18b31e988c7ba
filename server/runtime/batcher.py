"""Dynamic micro-batching: concurrent requests' images run through the engine together.

One worker task per served model version (or per shared backbone graph, whose batches mix the domains that run on it,
each row with its domain's prompts: repository/backbones.py) takes the first waiting request, then keeps taking more
until the batch holds `max_batch` images or `max_wait_ms` has passed (it waits only while other requests' images are
being decoded for it: a lone request runs at once), waits for one of the process's engine slots (EngineGate: the models
of one process share one thread budget, so several busy models never oversubscribe the cores), takes whatever else
arrived meanwhile and still fits, runs the batch on its inference thread (off the event loop), and hands each request
its rows. A request whose images would overflow the batch waits for the next one. The queue is bounded in images: past
`max_queue` the submit fails at once (the route answers 503) instead of letting latency grow without bound. Requests
that gave up (timed out) are skipped, not computed.

Shadow work (a rollout candidate's copy of requests another version answers, loop/rollout.py) waits in a queue of its
own and runs at the engine's lower priority: a shadow batch takes a slot only in a pause of the serving traffic (no
serving image waiting in any batcher of the process, none running, and the engine idle for about a batch's time:
EngineGate), and gives up its turn when serving work reaches its batcher first. It is never mixed into a serving
batch (a larger batch would take longer), and a running batch is never interrupted: the most a shadow batch can
delay a serving request is one batch, and only one that arrives in a pause.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np

from .. import tracing
from ..metrics import Metrics


class EngineStopped(RuntimeError):
    """The worker that runs batches is gone; liveness fails until the process is restarted."""


class Overloaded(RuntimeError):
    """The queue is full; retry later."""


@dataclass(eq=False)
class _Job:
    images: np.ndarray  # [n, 3, S, S]
    future: asyncio.Future
    extra: tuple[np.ndarray, ...] = ()  # the graph's further inputs, one row per image (a domain's prompts)
    queued_at: float = field(default_factory=time.perf_counter)
    timing: list[float] | None = None  # gets the engine milliseconds per image of the batch this job ran in
    trace: tracing.Waiting | None = None  # the request's span, linked from its batch's (tracing on only)


class EngineGate:
    """The process's engine slots: at most `slots` batches run at once, whichever models they belong to. Each
    session is given cores / slots threads, so the engines never ask for more threads than there are cores.
    Serving batches take slots first come, first served. A shadow batch takes one only when no serving batch runs
    or waits for a slot, no serving image is queued in any batcher (`serving_queued`), and the engine has been idle
    for `quiet` seconds (a recent serving batch's duration): under steady traffic the gap between two serving
    batches (decoding and HTTP) is shorter than a batch, and a shadow batch there would delay the next one, so
    shadow work runs in the pauses of the traffic, and is dropped (counted) when there are none."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0
        self.serving_queued = 0
        self.serving_running = 0
        self.quiet = 0.0  # seconds: a moving average of serving batches' durations
        self._idle_since = time.perf_counter()
        self._waiters: dict[bool, deque[asyncio.Future]] = {False: deque(), True: deque()}
        self._timer: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def slot(self):
        """A serving batch's slot: its duration sets how long a shadow batch waits for quiet."""
        await self.acquire()
        self.serving_running += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._idle_since = time.perf_counter()
            took = self._idle_since - started
            self.quiet = took if self.quiet == 0 else 0.8 * self.quiet + 0.2 * took
            self.serving_running -= 1
            self.release()

    async def acquire(self, shadow: bool = False) -> None:
        if self._free(shadow):
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[shadow].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was granted as the wait was cancelled
            else:
                with suppress(ValueError):
                    self._waiters[shadow].remove(waiter)
            raise

    def release(self) -> None:
        self.busy -= 1
        self._wake()

    def queued(self, images: int) -> None:
        """Serving images entering (+) or leaving (-) the batchers' queues: shadow waits while any wait."""
        self.serving_queued += images
        if self.serving_queued == 0:
            self._wake()

    def _free(self, shadow: bool) -> bool:
        if self.busy >= self.slots or self._waiters[False]:
            return False
        return not shadow or (self._shadow_may_run() and not self._waiters[True])

    def _shadow_may_run(self) -> bool:
        """No serving work anywhere, and quiet long enough; else a timer wakes the shadow waiters when it will be."""
        if self.serving_queued or self.serving_running:
            return False
        left = self._idle_since + self.quiet - time.perf_counter()
        if left > 0:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(left, self._quiet_over)
            return False
        return True

    def _quiet_over(self) -> None:
        self._timer = None
        self._wake()

    def _wake(self) -> None:
        while self.busy < self.slots:
            if self._waiters[False]:
                waiter = self._waiters[False].popleft()
            elif self._waiters[True] and self._shadow_may_run():
                waiter = self._waiters[True].popleft()
            else:
                return
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)


class MicroBatcher:
    def __init__(self, run: Callable[..., np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int,
                 metrics: Metrics, gate: EngineGate, labels: dict[str, str]) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.gate = gate
        self.labels = labels  # model and version, on every metric this batcher records
        self.queued_images = 0
        self.shadow_images = 0
        self.coming_images = 0  # images of requests still being decoded for this batcher
        self._gone = asyncio.Event()  # set when coming images are gone (a decode failed or was cancelled)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None
        self._shadow: deque[_Job] = deque()
        self._arrived = asyncio.Event()  # set on every submit: wakes the worker, or its wait for a shadow slot
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    @property
    def alive(self) -> bool:
        """Whether the worker that runs batches is still running (liveness reports it)."""
        return self._worker is not None and not self._worker.done()

    async def stop(self) -> None:
        """Stop taking batches; the batch running (if any) finishes in its thread without blocking the loop."""
        if self._worker is not None:
            self._worker.cancel()
            with suppress(asyncio.CancelledError, Exception):  # a worker that died already is reported by liveness
                await self._worker
            self._worker = None
            self.gate.queued(-self.queued_images)  # never run now: no shadow work may wait for them
        await asyncio.to_thread(self._executor.shutdown, True)

    async def submit(self, images: np.ndarray, *extra: np.ndarray, shadow: bool = False, limit: int | None = None,
                     timing: list[float] | None = None) -> np.ndarray:
        """Features for `images` (with `extra` inputs, row by row), computed in some batch; raises Overloaded when
        the queue is full. Jobs of a shared backbone carry their domain's prompts: one batch mixes domains.
        `shadow`: a rollout copy, run at the lower priority and refused past `limit` waiting shadow images.
        `timing` gets the engine milliseconds per image of the batch the images ran in."""
        if not self.alive:
            raise EngineStopped("the inference worker has stopped; the server needs a restart")
        if shadow:
            if limit is not None and self.shadow_images and self.shadow_images + len(images) > limit:
                raise Overloaded(f"{self.shadow_images} shadow images are already waiting (limit {limit})")
            if len(images) > self.max_batch:  # a batch each, so that serving work may go between them
                step = self.max_batch
                return np.concatenate(await asyncio.gather(*(
                    self.submit(images[i : i + step], *(e[i : i + step] for e in extra), shadow=True, timing=timing)
                    for i in range(0, len(images), step))))
            return await self._shadow_job(_Job(images, asyncio.get_running_loop().create_future(), extra,
                                               timing=timing, trace=tracing.waiting()))
        if self.queued_images + len(images) > self.max_queue:
            raise Overloaded(f"{self.queued_images} images are already waiting (limit {self.max_queue})")
        job = _Job(images, asyncio.get_running_loop().create_future(), extra, timing=timing, trace=tracing.waiting())
        self._add_queued(len(images))
        self.gate.queued(len(images))
        self._queue.put_nowait(job)
        self._arrived.set()
        return await job.future

    async def _shadow_job(self, job: _Job) -> np.ndarray:
        """Queue a shadow job; one whose caller gave up (a timeout) leaves the queue at once, its tensors with it."""
        self.shadow_images += len(job.images)
        self._shadow.append(job)
        self._arrived.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            for i, waiting in enumerate(self._shadow):
                if waiting is job:
                    del self._shadow[i]
                    self.shadow_images -= len(job.images)
                    break
            raise

    @contextmanager
    def coming(self, images: int):
        """Images on their way here (being decoded): a batch waits up to `max_wait_ms` for them to join it, and
        only for them: with nothing queued and nothing on its way, a batch runs at once, so a lone request never
        waits out the window."""
        self.coming_images += images
        try:
            yield
        finally:
            self.coming_images -= images
            self._gone.set()  # a batch waiting for them need not wait any more (their job, if any, is queued)

    def _add_queued(self, count: int) -> None:
        self.queued_images += count
        self.metrics.queue_depth.labels(**self.labels).set(self.queued_images)

    @property
    def _serving_waits(self) -> bool:
        return self._carry is not None or not self._queue.empty()

    async def _next_job(self, timeout: float | None) -> _Job | None:
        """The carried-over job, else the next queued one within `timeout` seconds (None: wait for one)."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        self._gone.clear()
        get, gone = asyncio.ensure_future(self._queue.get()), asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({get, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not get.done():
                get.cancel()  # the queue keeps an item a cancelled get did not return
        return get.result() if get.done() and not get.cancelled() else None

    async def _collect(self, jobs: list[_Job], wait: float | None) -> list[_Job]:
        """Add waiting jobs to `jobs` while they fit in a batch, waiting at most `wait` seconds for more."""
        count = sum(len(job.images) for job in jobs)
        deadline = None if wait is None else time.perf_counter() + wait
        while count < self.max_batch:
            if jobs and self._carry is None and self._queue.empty() and not self.coming_images:
                break  # nobody else is on the way: waiting out the window would only add latency
            job = await self._next_job(None if deadline is None else deadline - time.perf_counter())
            if job is None:
                if deadline is None or time.perf_counter() >= deadline:
                    break
                continue  # woken early by a decode that ended: the check above decides whether to wait on
            if jobs and count + len(job.images) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.images)
            deadline = deadline if deadline is not None else time.perf_counter() + self.max_wait
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._serving_waits and not self._shadow:
                self._arrived.clear()
                await self._arrived.wait()
            if self._serving_waits:
                jobs = await self._collect([], None)
                async with self.gate.slot():
                    jobs = await self._collect(jobs, 0)  # what arrived while another model's batch held the engine
                    self.gate.queued(-sum(len(job.images) for job in jobs))
                    await self._run(loop, jobs)
            elif await self._shadow_slot():
                try:
                    await self._run(loop, self._take_shadow(), shadow=True)
                finally:
                    self.gate.release()
            await asyncio.sleep(0)  # the slot goes to the batcher that waited for it, not back to this one

    async def _shadow_slot(self) -> bool:
        """An engine slot at the shadow priority, unless serving work reaches this batcher first (False: it goes
        first, and the shadow jobs wait on). A slot granted but not used (serving work came, or this worker is
        stopped meanwhile) is given back."""
        self._arrived.clear()
        acquire = asyncio.ensure_future(self.gate.acquire(shadow=True))
        granted = False
        try:
            while not self._serving_waits:
                arrived = asyncio.ensure_future(self._arrived.wait())
                try:
                    await asyncio.wait({acquire, arrived}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()
                self._arrived.clear()
                if acquire.done() and not self._serving_waits:
                    granted = True
                    return True
            return False
        finally:
            if not granted:
                if not acquire.done():
                    acquire.cancel()  # the gate gives back a slot granted as the wait was cancelled
                elif not acquire.cancelled() and acquire.exception() is None:
                    self.gate.release()

    def _take_shadow(self) -> list[_Job]:
        """Shadow jobs for one batch, oldest first; one larger than a batch runs alone (in pieces)."""
        jobs, count = [], 0
        while self._shadow and (not jobs or count + len(self._shadow[0].images) <= self.max_batch):
            job = self._shadow.popleft()
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], shadow: bool = False) -> None:
        live = [job for job in jobs if not job.future.done()]
        try:
            if live:
                batch = np.concatenate([job.images for job in live])
                started = time.perf_counter()
                with tracing.batch((job.trace for job in live), self.labels, len(batch), shadow):
                    features = await loop.run_in_executor(self._executor, self._run_in_pieces, batch,
                                                          [job.extra for job in live])
                elapsed = time.perf_counter() - started
                self.metrics.batch_size.labels(**self.labels).observe(len(batch))
                self.metrics.inference_seconds.labels(**self.labels).observe(elapsed)
                offset = 0
                for job in live:
                    rows = features[offset : offset + len(job.images)]
                    offset += len(job.images)
                    if job.timing is not None:
                        job.timing.append(1000 * elapsed / len(batch))
                    if not job.future.done():
                        job.future.set_result(rows)
        except Exception as err:  # the engine failed: every request of this batch learns why
            for job in live:
                if not job.future.done():
                    job.future.set_exception(err)
        finally:
            if shadow:
                self.shadow_images -= sum(len(job.images) for job in jobs)
            else:
                self._add_queued(-sum(len(job.images) for job in jobs))

    def _run_in_pieces(self, batch: np.ndarray, extras: list[tuple[np.ndarray, ...]]) -> np.ndarray:
        """A single request may hold more images than the batch limit; run it in limit-sized pieces. The jobs'
        extra inputs (a domain's prompts, broadcast per row) are materialised here, off the event loop."""
        extra = [np.concatenate([job[i] for job in extras]) for i in range(len(extras[0]))]
        step = self.max_batch
        return np.concatenate([self.run(batch[i : i + step], *(e[i : i + step] for e in extra))
                               for i in range(0, len(batch), step)])
