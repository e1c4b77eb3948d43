"""What both services' HTTP doors share: the uvicorn server in the gRPC server's event loop,
and one ASGI guard in front of every route.

HTTP is a second door into the same handlers as gRPC, so it takes the same settings:
`--tls-cert/--tls-key/--tls-client-ca` (TLS, mutual TLS), `--auth-token` (bearer token on
every route but the health probes), `--max-message-mb` (largest request body), the same
Prometheus request metrics under `protocol="http"`, and the drain on SIGTERM (new requests
get 503 while the ones in flight finish).

The guard also gives every request an id as gRPC calls get one (splitserve_common.request_log):
the caller's `x-request-id` header, or a new one; it is answered in the `x-request-id` response
header, sent on with the calls made on the request's behalf, and written in the access line.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
import time
from collections.abc import Callable

import grpc
import uvicorn

from splitserve_common import metrics, request_log, security
from splitserve_common.settings import Option

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"

# gRPC status -> HTTP status (the mapping grpc-gateway and KServe use).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


class CallFailed(Exception):
    """A call that ended with a gRPC status other than OK (see HttpCallContext)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return http_status(self.code)


class HttpCallContext:
    """The part of grpc.aio.ServicerContext a servicer uses (deadline, metadata, abort), for an HTTP request.

    HTTP routes call the very servicer methods gRPC calls, so the servicer's error mapping
    (`splitserve_common.errors.grpc_errors`) applies unchanged: it ends a failed call with
    `context.abort(code, message)`, which here raises `CallFailed` for the route to answer in
    its protocol's error shape.
    """

    def __init__(self, request_id: str, timeout: float | None = None):
        self.request_id = request_id
        self._timeout = timeout

    def time_remaining(self) -> float | None:
        return self._timeout

    def invocation_metadata(self):
        return ((REQUEST_ID_HEADER, self.request_id),)

    def peer(self) -> str:
        return "http"

    async def send_initial_metadata(self, _metadata) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = ""):
        raise CallFailed(code, details)


def http_port_option(default_port: int, what: str) -> Option:
    """`--http-port`: each service has its own default; 0 turns the HTTP door off."""
    return Option("http-port", default_port, f"HTTP port of {what} (0 turns HTTP off)", int)


# An error body for (path, HTTP status, message, error code): each door answers in its own shape.
ErrorBody = Callable[[str, int, str, str], bytes]


class HttpGuard:
    """Pure ASGI middleware: request id, bearer token, body size limit, drain gate, metrics.

    Routes find the request id and the body limit in `scope["state"]` (`request_id`, `max_body`).

    `routes` maps a request's (method, path) to the metrics name of its route; anything else is
    counted as "other" so a scanner cannot grow the label set. `open_paths` need no token.
    """

    def __init__(self, app, *, token: str, max_body: int, error_body: ErrorBody, route_name,
                 open_paths: tuple[str, ...] = ()):
        self.app = app
        self._expected = security.bearer_value(token).encode() if token else None
        self.max_body = max_body
        self.error_body = error_body
        self.route_name = route_name
        self.open_paths = open_paths
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics: dict[str, metrics.HttpRequestMetrics] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        name = self.route_name(scope["method"], path)
        access = request_log.HttpAccess(name, headers.get(b"x-request-id", b"").decode("latin-1"),
                                        headers.get(b"traceparent", b"").decode("latin-1"))
        request_id = access.info.request_id
        state = scope.setdefault("state", {})
        state["request_id"], state["max_body"] = request_id, self.max_body
        measured = self._metrics.get(name)
        if measured is None:
            measured = self._metrics[name] = metrics.HttpRequestMetrics(name)
        status = [500]
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        measured.in_flight.inc()
        start = time.perf_counter()
        self.in_flight += 1
        self._idle.clear()
        try:
            refusal = self._refusal(path, headers)
            if refusal is not None:
                await self._answer(send_with_id, path, *refusal)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            measured.finish(start, status[0])
            access.finish(status[0])

    def _refusal(self, path: str, headers: dict):
        if self.draining:
            return 503, "the server is shutting down", "unavailable"
        if self._expected is not None and not path.startswith(self.open_paths):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                return 401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')", \
                    "invalid_api_key"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, self._too_large(), "message_too_large"
        return None

    def _too_large(self) -> str:
        return body_too_large(self.max_body)

    async def _answer(self, send, path: str, status: int, message: str, code: str) -> None:
        body = self.error_body(path, status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def body_too_large(limit: int) -> str:
    """The message for a body over the limit (the guard checks Content-Length; routes reading a
    body without one stop at the same limit)."""
    return f"request body larger than {limit} bytes (--max-message-mb)"


class HttpFront:
    """uvicorn serving `guard` on host:port in the running event loop (beside the gRPC server).

    uvicorn's own `serve()` would install signal handlers; the gRPC side owns SIGTERM, so this
    runs uvicorn's startup and shutdown steps directly and drains through the guard.
    """

    def __init__(self, guard: HttpGuard, args, port: int):
        self.guard = guard
        client_ca = getattr(args, "tls_client_ca", "")
        security.server_credentials(args)  # the same checks (and errors) as the gRPC port's TLS
        self.config = uvicorn.Config(
            guard, host=args.host, port=port, lifespan="off", access_log=False, log_config=None,
            log_level=logging.WARNING, server_header=False, timeout_graceful_shutdown=1,
            ssl_certfile=getattr(args, "tls_cert", "") or None, ssl_keyfile=getattr(args, "tls_key", "") or None,
            ssl_ca_certs=client_ca or None, ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE)
        self.server = uvicorn.Server(self.config)
        self.port = port

    async def start(self) -> int:
        """Bind and serve; returns the bound port. A port already in use stops the process."""
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup()
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def begin_drain(self) -> None:
        """New requests get 503 from now on; those in flight go on."""
        self.guard.draining = True

    async def stop(self, grace_seconds: float) -> None:
        if not await self.guard.wait_idle(grace_seconds):
            log.warning("HTTP drain time up with %d request(s) in flight", self.guard.in_flight)
        await self.server.shutdown()
