"""Prometheus metrics of preproc_service: requests by method and status, latency."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import grpc
from prometheus_client import Counter, Histogram

from splitserve_common.errors import ServiceError

REQUESTS = Counter("preproc_requests_total", "Requests handled", ["method", "code"])
LATENCY = Histogram("preproc_request_seconds", "Request latency", ["method"],
                    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))


@contextmanager
def observe(method: str):
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except ServiceError as exc:
        code = exc.code
        raise
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        raise
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = grpc.StatusCode.INTERNAL
        raise
    finally:
        REQUESTS.labels(method, code.name).inc()
        LATENCY.labels(method).observe(time.perf_counter() - start)


def serve_metrics(port: int) -> None:
    """Expose /metrics over HTTP; port 0 turns it off (idempotent: serving.create_server starts it too)."""
    from splitserve_common.metrics import start_metrics_server

    start_metrics_server(port)
