"""The gRPC servicer context an HTTP request hands to the servicer's methods.

HTTP calls the very methods gRPC calls (`PreprocServicer.Chat(request, context)` ...), so the
servicer's error mapping (`splitserve_common.errors.grpc_errors`) applies unchanged: it ends a
failed call with `context.abort(code, message)`, which here raises `CallFailed` for the route
to answer in its protocol's error shape.
"""

from __future__ import annotations

import grpc

from splitserve_common.http_front import REQUEST_ID_HEADER, http_status


class CallFailed(Exception):
    """A call that ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status(self.code)


class HttpCallContext:
    """The part of grpc.aio.ServicerContext the servicer uses: deadline, metadata, abort."""

    def __init__(self, request_id: str, timeout: float | None = None):
        self.request_id = request_id
        self._timeout = timeout

    def time_remaining(self) -> float | None:
        return self._timeout

    def invocation_metadata(self):
        return ((REQUEST_ID_HEADER, self.request_id),)

    def peer(self) -> str:
        return "http"

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise CallFailed(code, details)
