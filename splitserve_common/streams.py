"""One helper for every bidirectional streaming RPC: bounded, ordered, cancelled when the caller leaves.

    async for answer in ordered_stream(request_iterator, handle, window):
        yield answer

- at most `window` requests of one stream are being handled at once: reading the next
  request waits for a free slot (backpressure reaches the client through HTTP/2 flow control);
- answers go out in the order the requests came in;
- when the consumer stops (the client cancelled or went away, or the RPC failed), reading stops
  and every handler still running is cancelled.

`handle(request)` should answer a bad request with an answer (an error item), not raise: an
exception ends the whole stream. A failure reading the request stream ends it too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


async def ordered_stream(requests: AsyncIterator[Request], handle: Callable[[Request], Awaitable[Answer]],
                         window: int) -> AsyncIterator[Answer]:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    slots = asyncio.Semaphore(window)
    started: asyncio.Queue = asyncio.Queue()  # handler tasks in input order; None after the last

    async def read() -> None:
        async for request in requests:
            await slots.acquire()
            await started.put(asyncio.ensure_future(handle(request)))
        await started.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            next_task = asyncio.ensure_future(started.get())
            await asyncio.wait({next_task, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not next_task.done() and reader.exception() is not None:
                next_task.cancel()
                reader.result()  # the request stream failed: raise its error
            task = await next_task
            if task is None:
                break
            try:
                answer = await task
            finally:
                slots.release()
            yield answer
        await reader
    finally:
        reader.cancel()
        while not started.empty():
            task = started.get_nowait()
            if task is not None:
                task.cancel()
