"""Requests that do not parse are INVALID_ARGUMENT, not UNKNOWN.

grpc runs a method's request deserializer before any application code, and a message it
cannot parse (e.g. a `string` field holding bytes that are not UTF-8) ends the call as
UNKNOWN "Unexpected DecodeError". `DecodeErrorInterceptor` gives every method a deserializer
that hands such a message on as an `Undecodable` marker instead, and a behavior that answers
the marker with INVALID_ARGUMENT (for request streams: when the bad message is read).
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    def __init__(self, method: str, error: DecodeError):
        self.message = f"{method}: the request message does not parse ({error}); string fields must be valid UTF-8"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._handlers: dict[str, tuple] = {}  # method -> (handler, wrapped handler)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        entry = self._handlers.get(method)
        if entry is None or entry[0] is not handler:
            entry = (handler, _wrapped(handler, method))
            self._handlers[method] = entry
        return entry[1]


def _wrapped(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(method, exc)

    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, _checked_request(handler.unary_unary)
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, _checked_request(handler.unary_stream)
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, _checked_stream(handler.stream_unary)
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, _checked_stream(handler.stream_stream)
    return factory(behavior, request_deserializer=deserialize, response_serializer=handler.response_serializer)


def _checked_request(behavior):
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behavior(request, context):
                yield item

        return streaming

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        result = behavior(request, context)
        return (await result) if inspect.isawaitable(result) else result

    return unary


def _checked_stream(behavior):
    async def requests(request_iterator, context):
        async for request in request_iterator:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def streaming(request_iterator, context):
            async for item in behavior(requests(request_iterator, context), context):
                yield item

        return streaming

    async def unary(request_iterator, context):
        result = behavior(requests(request_iterator, context), context)
        return (await result) if inspect.isawaitable(result) else result

    return unary
