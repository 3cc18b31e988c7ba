"""The micro-batcher's window: a batch waits for images other requests are decoding for it, and for nothing else."""
from __future__ import annotations

import asyncio
import time

import numpy as np

from server.runtime.batcher import EngineGate, MicroBatcher
from server.metrics import Metrics

WINDOW_MS = 2000  # long, so that waiting it out shows


def _batcher(sizes: list[int]) -> MicroBatcher:
    def run(batch):
        sizes.append(len(batch))
        return batch[:, :2]

    return MicroBatcher(run, 8, WINDOW_MS, 64, Metrics(), EngineGate(1), {"model": "m", "version": "1"})


def _images(count: int) -> np.ndarray:
    return np.zeros((count, 4), np.float32)


def test_a_lone_request_runs_at_once():
    async def scenario():
        sizes: list[int] = []
        batcher = _batcher(sizes)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(_images(1))
        took = time.perf_counter() - started
        await batcher.stop()
        return sizes, took

    sizes, took = asyncio.run(scenario())
    assert sizes == [1] and took < 0.5, (sizes, took)


def test_a_batch_waits_for_images_being_decoded_and_takes_them():
    async def scenario():
        sizes: list[int] = []
        batcher = _batcher(sizes)
        batcher.start()

        async def decoded_later():
            with batcher.coming(2):
                await asyncio.sleep(0.3)  # decoding
                return batcher.submit(_images(2))  # queued before the count drops, as the service does

        later = asyncio.create_task(decoded_later())
        await asyncio.sleep(0.05)
        first = asyncio.create_task(batcher.submit(_images(1)))
        await asyncio.gather(first, await later)
        await batcher.stop()
        return sizes

    assert asyncio.run(scenario()) == [3]  # one batch: the first request waited for the two being decoded


def test_a_decode_that_fails_wakes_the_batch_waiting_for_it():
    async def scenario():
        sizes: list[int] = []
        batcher = _batcher(sizes)
        batcher.start()

        async def decode_that_is_cancelled():
            with batcher.coming(1):
                await asyncio.sleep(10)

        decoding = asyncio.create_task(decode_that_is_cancelled())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        waiting = asyncio.create_task(batcher.submit(_images(1)))
        await asyncio.sleep(0.1)
        decoding.cancel()
        await waiting
        took = time.perf_counter() - started
        await batcher.stop()
        return sizes, took, batcher.coming_images

    sizes, took, coming = asyncio.run(scenario())
    assert sizes == [1] and coming == 0 and took < 1.0, (sizes, took)  # not the 2 s window
