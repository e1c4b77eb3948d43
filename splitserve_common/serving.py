"""What both gRPC servers share: options, health, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve_common.settings import Option

log = logging.getLogger(__name__)

# Settings every server takes (each service adds its own).
SERVER_OPTIONS = [
    Option("host", "0.0.0.0", "address to listen on"),
    Option("max-message-mb", 64, "largest request or response message in MiB", int),
    Option("drain-seconds", 25.0, "on SIGTERM, how long in-flight calls may take to finish", float),
    Option("log-level", "INFO", "logging level", choices=["DEBUG", "INFO", "WARNING", "ERROR"]),
]


def create_server(args, interceptors=()) -> grpc.aio.Server:
    """A grpc.aio server with the shared options (message limits, keepalive policy).

    `args` carries the SERVER_OPTIONS values. TLS, bearer-token auth and metrics
    hook in here so both services get them the same way.
    """
    return grpc.aio.server(options=grpc_options(args.max_message_mb), interceptors=list(interceptors))


def add_port(server: grpc.aio.Server, args, port: int) -> int:
    """Bind host:port (port 0 picks a free one); returns the bound port."""
    return server.add_insecure_port(f"{args.host}:{port}")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Let clients keep idle connections alive with pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class HealthReporter:
    """grpc.health.v1 for the whole server ("") and each named service."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]):
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.names:
            await self.servicer.set(name, status)


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )


async def wait_for_termination(server: grpc.aio.Server, health_reporter: HealthReporter, drain_seconds: float,
                               on_drain=None) -> None:
    """Serve until SIGTERM/SIGINT; then report NOT_SERVING, refuse new calls and let in-flight ones finish."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("signal received: draining for up to %.1f s", drain_seconds)
        await health_reporter.set(False)
        if on_drain is not None:
            await on_drain()
        await server.stop(drain_seconds)
    stopper.cancel()
    await server_done
