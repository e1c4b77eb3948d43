"""Requests that do not decode are INVALID_ARGUMENT, not UNKNOWN.

grpc decodes each request message before any handler runs; when protobuf refuses the bytes
(invalid UTF-8 in a string field, a truncated message) grpc answers UNKNOWN "Unexpected
DecodeError" and no handler ever sees the call. `DecodeErrorInterceptor` gives every method a
deserializer that turns such bytes into an `Undecodable` marker instead, and a behavior that
refuses the marker with INVALID_ARGUMENT (in a request stream: when the bad message is read).
"""

from __future__ import annotations

import functools
import inspect

import grpc
from google.protobuf.message import DecodeError

from splitserve_common.errors import InvalidArgument
from splitserve_common.metrics import wrap_handler


class Undecodable:
    def __init__(self, message: str):
        self.message = message


def _safe(deserializer, method: str):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Undecodable(f"{method}: the request message does not decode ({exc}); string fields must be "
                               "valid UTF-8")
    return deserialize


async def _checked_stream(requests):
    async for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidArgument(request.message)
        yield request


def _refusing(behavior):
    """The behavior, refusing an Undecodable request first (unary requests) or when read (streams)."""
    if inspect.isasyncgenfunction(behavior):
        @functools.wraps(behavior)
        async def stream_response(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            if not hasattr(request, "__aiter__"):
                async for item in behavior(request, context):
                    yield item
                return
            async for item in behavior(_checked_stream(request), context):
                yield item
        return stream_response

    @functools.wraps(behavior)
    async def unary_response(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if hasattr(request, "__aiter__"):
            request = _checked_stream(request)
        return await behavior(request, context)
    return unary_response


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._by_method: dict[str, tuple] = {}  # method -> (handler, its refusing twin)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        entry = self._by_method.get(method)
        if entry is None or entry[0] is not handler:
            twin = wrap_handler(handler, _refusing)._replace(
                request_deserializer=_safe(handler.request_deserializer, method.rsplit("/", 1)[-1]))
            entry = self._by_method[method] = (handler, twin)
        return entry[1]
