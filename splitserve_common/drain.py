"""Graceful drain: refuse new calls cleanly, let the calls in flight finish.

grpc's own `server.stop(grace)` has a race: a call that reaches the server just
as it stops, before the application has picked it up, is dropped with CANCELLED,
which a client cannot tell from a call that was cancelled half-way. So the drain
happens in two steps:

1. `DrainGate.close()`: from now on every new call (health checks excepted, they
   answer NOT_SERVING) is refused with UNAVAILABLE, which clients may safely retry
   on another replica, while the server keeps running and the calls in flight go on;
2. once none is left in flight and no call has been admitted or finished for a moment
   (a client answered just now may already be sending its next call, which is then
   refused cleanly instead of dropped), or the drain time is up, the process exits
   (serving.end_process): a call that reaches it in that instant fails with UNAVAILABLE.
   Refused calls are not activity: clients that keep retrying do not hold the drain open.
"""

from __future__ import annotations

import asyncio
import inspect
import time

import grpc

from splitserve_common.metrics import WrappedHandlers, wrap_handler

# Health stays answerable while draining: probes and watchers see NOT_SERVING, not a refused call.
ALWAYS_ALLOWED = ("/grpc.health.v1.Health/",)
# How long no call may have been admitted or finished before the process exits.
QUIET_SECONDS = 0.5


class DrainGate(grpc.aio.ServerInterceptor):
    """Counts calls in flight and, once closed, refuses new ones with UNAVAILABLE."""

    def __init__(self):
        self.closed = False
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self._handlers = WrappedHandlers(lambda behavior, _method: self._counted(behavior))

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self, timeout: float, quiet: float = QUIET_SECONDS) -> bool:
        """Wait until no call is in flight and none was admitted or finished for `quiet` seconds; False on
        timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight == 0 and time.monotonic() - self.last_activity >= quiet:
                return True
            await asyncio.sleep(0.05)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(ALWAYS_ALLOWED):
            return handler
        if self.closed:
            # A refused call is not activity: clients that keep retrying must not hold the drain open.
            return wrap_handler(handler, lambda _behavior: _refuse)
        return self._handlers.get(handler_call_details.method, handler)

    def _enter(self) -> None:
        self.in_flight += 1
        self.last_activity = time.monotonic()

    def _leave(self) -> None:
        self.in_flight -= 1
        self.last_activity = time.monotonic()

    def _counted(self, behavior):
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request_or_iterator, context):
                self._enter()
                try:
                    async for item in behavior(request_or_iterator, context):
                        yield item
                finally:
                    self._leave()

            return streaming

        async def unary(request_or_iterator, context):
            self._enter()
            try:
                result = behavior(request_or_iterator, context)
                return (await result) if inspect.isawaitable(result) else result
            finally:
                self._leave()

        return unary


async def _refuse(_request, context):
    await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
