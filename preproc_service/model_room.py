"""Room in model_service's queue for this preproc's large requests, taken before they are tokenized.

model_service refuses (RESOURCE_EXHAUSTED) a call whose rows do not fit in its queue (--max-queue-rows).
Under a flood of large requests most were refused so only after preproc had tokenized them: its CPU was
spent for nothing, beside the normal callers. Now a request of more rows than one model request holds
(model_service's --max-batch-size) first takes room for its rows: while this preproc's other large
requests hold so many rows that its own would not fit in the model queue, it waits, first come first
served and tokenizing nothing, until one of them is answered. At most `max_waiting` wait; one more is
refused at once with RESOURCE_EXHAUSTED naming the flag, and a wait that outlasts the caller's deadline
ends in DEADLINE_EXCEEDED.

A request that fits in one model request never waits here: model_service's own admission is for it, and a
normal caller must not queue behind a flood. Neither does one of more rows than the whole queue holds
(Deployment refuses it with INVALID_ARGUMENT). The rows counted are the request's inputs, the fewest model
rows it can make (question-answering windows and zero-shot pairs make more), so no request waits for room
it does not need.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from splitserve_common import metrics
from splitserve_common.errors import ConfigurationError, DeadlineExceeded, ResourceExhausted
from splitserve_common.settings import Option

MAX_WAITING_OPTION = Option(
    "max-waiting-large-requests", 16, "most requests of more rows than one model request (model_service's "
    "--max-batch-size) that wait, before tokenizing, for room in model_service's queue (its --max-queue-rows) "
    "while this preproc's other large requests fill it; more are refused with RESOURCE_EXHAUSTED (0: refused at "
    "once instead of waiting)", int)


class ModelRoom:
    def __init__(self, max_waiting: int = 16):
        if max_waiting < 0:
            raise ConfigurationError(f"--max-waiting-large-requests must be >= 0, not {max_waiting}")
        self.max_waiting = max_waiting
        self.held = 0  # rows of the large requests admitted and not yet answered
        self.capacity = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def rows(self, rows: int, capacity: int, one_request: int, timeout: float | None):
        """Hold room for `rows` in a model queue of `capacity` rows while the body runs (see the module);
        `one_request`: the most rows one model request holds; `timeout`: seconds left to the caller."""
        if not capacity or rows <= one_request or rows > capacity:
            yield
            return
        self.capacity = capacity
        if self._waiting or self.held + rows > capacity:
            await self._wait(rows, timeout)
        else:
            self.held += rows
        try:
            yield
        finally:
            self.held -= rows
            self._admit()

    async def _wait(self, rows: int, timeout: float | None) -> None:
        if len(self._waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"model_service's queue ({self.capacity} rows, its --max-queue-rows) is taken by this preproc's "
                f"large requests ({self.held} rows) and {len(self._waiting)} more wait for room, the most "
                "--max-waiting-large-requests allows: retry later")
        entry = (rows, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        metrics.set_large_requests_waiting(len(self._waiting))
        try:
            await asyncio.wait_for(entry[1], timeout)
        except BaseException as exc:
            if entry[1].done() and not entry[1].cancelled():
                self.held -= rows  # admitted as it gave up: the room goes to the next
            else:
                with contextlib.suppress(ValueError):  # _admit may have dropped it, cancelled, already
                    self._waiting.remove(entry)
            self._admit()
            metrics.set_large_requests_waiting(len(self._waiting))
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"deadline exceeded while waiting for room for {rows} rows in model_service's "
                                       f"queue ({self.held} rows of this preproc's large requests there)") from None
            raise

    def _admit(self) -> None:
        """Let waiting requests in, in arrival order, while their rows fit."""
        while self._waiting and self.held + self._waiting[0][0] <= self.capacity:
            rows, future = self._waiting.popleft()
            if future.done():  # its wait ended (deadline, cancel) and it is on its way out
                continue
            self.held += rows
            future.set_result(None)
        metrics.set_large_requests_waiting(len(self._waiting))
