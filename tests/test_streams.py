"""splitserve_common/streams.py: bounded, ordered, cancelled when the consumer stops."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from splitserve_common.streams import ordered_stream


async def _requests(items, delay=0.0):
    for item in items:
        if delay:
            await asyncio.sleep(delay)
        yield item


def test_answers_in_input_order_with_at_most_window_in_flight():
    in_flight, most = 0, 0

    async def handle(n):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (20 - n % 20))  # later requests finish first
        in_flight -= 1
        return n * 10

    async def run():
        return [answer async for answer in ordered_stream(_requests(range(60)), handle, window=4)]

    assert asyncio.run(run()) == [n * 10 for n in range(60)]
    assert most == 4


def test_consumer_leaving_cancels_running_handlers_and_stops_reading():
    started, cancelled, read = [], [], []

    async def requests():
        for n in range(1000):
            read.append(n)
            yield n

    async def handle(n):
        started.append(n)
        try:
            await asyncio.sleep(0 if n == 0 else 10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise
        return n

    async def run():
        stream = ordered_stream(requests(), handle, window=8)
        assert await anext(stream) == 0
        for _ in range(10_000):  # the window fills within a few turns of the loop, however slow the machine
            if len(started) == 9:
                break
            await asyncio.sleep(0)
        await stream.aclose()  # what grpc does when the client goes away
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert sorted(cancelled) == list(range(1, 9)) == sorted(started[1:])
    assert len(read) <= 10  # reading stopped at the window, not at the end of the input


def test_a_failing_request_stream_ends_the_stream_with_its_error():
    async def requests():
        yield 1
        raise ValueError("the client's stream broke")

    async def handle(n):
        return n

    async def run():
        got = []
        with pytest.raises(ValueError, match="stream broke"):
            async for answer in ordered_stream(requests(), handle, window=2):
                got.append(answer)
        return got

    assert asyncio.run(run()) in ([], [1])


def test_a_raising_handler_ends_the_stream_and_cancels_the_rest():
    cancelled = []

    async def handle(n):
        if n == 1:
            raise RuntimeError("bug")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    async def run():
        async def consume():
            async for _ in ordered_stream(_requests([1, 2, 3]), handle, window=3):
                pass
        with contextlib.suppress(RuntimeError):
            await consume()
        await asyncio.sleep(0.01)

    asyncio.run(run())
    assert sorted(cancelled) == [2, 3]


def test_window_must_be_positive():
    async def run():
        async for _ in ordered_stream(_requests([1]), asyncio.sleep, window=0):
            pass

    with pytest.raises(ValueError, match="window"):
        asyncio.run(run())
