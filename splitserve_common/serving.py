"""What both gRPC servers share: options, health, reflection, graceful drain,
TLS/mTLS and the bearer token (security.py), Prometheus metrics (metrics.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterable
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve_common import metrics, request_log, security, tracing
from splitserve_common.decoding import DecodeErrorInterceptor
from splitserve_common.drain import DrainGate
from splitserve_common.errors import ConfigurationError
from splitserve_common.settings import Option, seconds

log = logging.getLogger(__name__)

# Settings every server takes (each service adds its own).
SERVER_OPTIONS = [
    Option("host", "0.0.0.0", "address to listen on"),
    Option("max-message-mb", 64, "largest request or response message in MiB", int),
    Option("drain-seconds", 25.0, "on SIGTERM, how long in-flight calls may take to finish", seconds),
    Option("log-level", "INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]),
    Option("log-format", "text", "log lines as text or as one JSON object each (access lines: one per request)",
           choices=list(request_log.LOG_FORMATS)),
    *security.SECURITY_OPTIONS,
]


def metrics_port_option(default_port: int) -> Option:
    """`--metrics-port`: each service has its own default (contracts: 8002 model, 8012 preproc)."""
    return Option("metrics-port", default_port, "port of the Prometheus /metrics HTTP endpoint (0: off)", int)


def create_server(args, interceptors=()) -> grpc.aio.Server:
    """A grpc.aio server with the shared options (message limits, keepalive policy).

    `args` carries the SERVER_OPTIONS values and `metrics_port` (metrics_port_option).
    With tracing configured (OTEL_* variables, tracing.py), each call first gets its span.
    Every call gets its request id and access line (request_log.py; outermost, so refused
    calls are logged too), is counted by the metrics interceptor (counted as soon as it
    ends: an aborted call's status reaches the caller at once), then checked for the
    bearer token when one is set, then passes the drain gate (wait_for_termination
    closes it); innermost, a request that does not parse is answered INVALID_ARGUMENT
    (decoding.py). The /metrics HTTP endpoint starts here.
    """
    gate = DrainGate()
    tracing.setup(_service_name())
    chain = [*tracing.server_interceptors(), request_log.AccessLogInterceptor(), metrics.MetricsInterceptor(),
             *security.server_interceptors(args), gate, *interceptors, DecodeErrorInterceptor()]
    metrics.start_metrics_server(args.metrics_port, args.host)
    server = grpc.aio.server(options=grpc_options(args.max_message_mb), interceptors=chain)
    _drain_gates[id(server)] = gate
    return server


_drain_gates: dict[int, DrainGate] = {}  # id(server) -> its gate


def _service_name() -> str:
    """The running service's package (`python -m preproc_service` -> preproc_service): tracing's default name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name.partition(".")[0] if spec is not None and spec.name else "splitserve"


def add_port(server: grpc.aio.Server, args, port: int) -> int:
    """Bind host:port (port 0 picks a free one), with TLS/mTLS when configured; returns the bound port."""
    credentials = security.server_credentials(args)
    address = f"{args.host}:{port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc's "Failed to bind to address"
        raise ConfigurationError(f"cannot listen on {address}: the port is in use by another process or the "
                                 "address is not this host's (--host, --port)") from exc


def run_service(prog: str, main: Coroutine) -> int:
    """Run a service's main coroutine for its CLI: a ConfigurationError is one line on stderr and exit 2."""
    try:
        asyncio.run(main)
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(request_log.formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Exclusive bind: with SO_REUSEPORT (grpc's default) a second server on a busy port starts
        # fine and the kernel splits new connections between the two.
        ("grpc.so_reuseport", 0),
        # Let clients keep idle connections alive with pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class DrainingHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 (Check and Watch) that knows about draining.

    Unlike grpc's reference servicer, Watch streams end (after sending NOT_SERVING)
    once draining starts: an open Watch is an in-flight call and would otherwise
    hold the drain open until the grace period runs out. While draining, `set` is
    ignored, so nothing can report SERVING again.
    """

    def __init__(self):
        self._status: dict[str, int] = {}
        self._version = 0
        self._changed = asyncio.Condition()
        self.draining = False

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:
            seen = self._version
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self.draining:
                return
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self._version != seen)

    async def set(self, service: str, status: int) -> None:
        if not self.draining:
            await self._update({service: status})

    async def drain(self) -> None:
        self.draining = True
        await self._update(dict.fromkeys(self._status, health_pb2.HealthCheckResponse.NOT_SERVING))

    async def _update(self, statuses: dict[str, int]) -> None:
        async with self._changed:
            self._status.update(statuses)
            self._version += 1
            self._changed.notify_all()


class HealthReporter:
    """grpc.health.v1 for the whole server ("") and each named service."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]):
        self.servicer = DrainingHealthServicer()
        self.names = ["", *service_names]
        self.serving = False  # what the HTTP doors' health routes answer
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool, not_serving: Iterable[str] = ()) -> None:
        """Every service SERVING (or not); the services named in `not_serving` NOT_SERVING whatever `serving`."""
        left_out = set(not_serving)
        self.serving = serving and not self.servicer.draining
        for name in self.names:
            up = serving and name not in left_out
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if up
                                    else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def drain(self) -> None:
        """NOT_SERVING for good: later `set` calls are ignored and Watch streams end."""
        self.serving = False
        await self.servicer.drain()


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )


async def wait_for_termination(server: grpc.aio.Server, health_reporter: HealthReporter, drain_seconds: float,
                               on_drain=None, after_drain=None) -> None:
    """Serve until SIGTERM/SIGINT; then drain and end the process: report NOT_SERVING, refuse new calls
    with UNAVAILABLE, let the calls in flight finish (at most `drain_seconds`), exit. Returns only
    when the server stops by itself. See drain.py for the steps and end_process for the exit.

    `on_drain()` runs as the drain starts; `after_drain(seconds_left)` once the gRPC calls are done,
    for other doors of the process to finish theirs before it exits."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: draining for up to %.1f s", drain_seconds)
        started = loop.time()
        await health_reporter.drain()
        gate = _drain_gates.pop(id(server), None)
        if gate is not None:
            gate.close()
        if on_drain is not None:
            await on_drain()
        if gate is not None and not await gate.wait_idle(drain_seconds):
            log.warning("drain time up with %d call(s) still in flight: ending them", gate.in_flight)
        if after_drain is not None:
            await after_drain(max(0.0, drain_seconds - (loop.time() - started)))
        log.info("drained in %.2f s", loop.time() - started)
        end_process()
    stopper.cancel()
    await server_done


def end_process() -> NoReturn:
    """The drain's last step: exit now, without grpc's server.stop().

    server.stop() cancels the calls that reach the server in its last instant, and their clients
    see a bare CANCELLED, which they must not retry. Once the drain is over nothing is left to
    finish (no call in flight, or the drain time is up), so the process exits: the kernel closes
    the connections and such a call fails with UNAVAILABLE, which clients retry on another replica.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
