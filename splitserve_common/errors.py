"""The one mapping from failures to gRPC status codes.

Handlers raise a ServiceError subclass (or let a peer's AioRpcError through);
`grpc_errors` turns it into a status with a message that says what was wrong.
Anything else becomes INTERNAL with the exception text, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class ConfigurationError(Exception):
    """A setting the service cannot start with (busy port, unreadable file, bad flag value).

    Raised by library code at start-up; only the command-line entry points turn it into a
    message on stderr and a non-zero exit (serving.run_service).
    """


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


@contextlib.contextmanager
def peer_errors(peer: str, doing: str = "answer"):
    """Inside: a call to another service (`peer`, e.g. "model service at host:8001").

    Its UNAVAILABLE and DEADLINE_EXCEEDED become ours with the peer named; other statuses
    (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) pass through unchanged, since they are about
    the caller's request.
    """
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise Unavailable(f"{peer} is unavailable: {exc.details()}") from None
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"{peer} did not {doing} in time") from None
        raise


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for any exception raised while serving a call."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_errors(method):
    """Decorate an asyncio servicer method (unary or streaming) so that errors become statuses."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                code, message = status_of(exc)
                await context.abort(code, message)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            code, message = status_of(exc)
            await context.abort(code, message)

    return unary_wrapper
