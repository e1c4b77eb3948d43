"""Prometheus metrics shared by both services, and the HTTP endpoint that serves them.

Each process is one service, so metrics carry no service label (Prometheus adds
`job`/`instance`). Code records what it measures through the small API below;
requests by method and status code and requests in flight are recorded for every
call by `MetricsInterceptor`, which `serving.create_server` installs (health checks and
reflection are not requests: they are not counted). `model` is the served model's name
(`set_model`), `adapter` the adapter a request asked for (empty: the default); a call
that failed is counted under adapter "" (so a caller cannot mint label values).

Names (all prefixed `splitserve_`):

| metric | type | labels |
| --- | --- | --- |
| `splitserve_requests_total` | counter | `protocol`, `method`, `code`, `model`, `adapter` |
| `splitserve_request_duration_seconds` | histogram | `protocol`, `method`, `model`, `adapter` |
| `splitserve_requests_in_flight` | gauge | `protocol`, `method` |
| `splitserve_stream_items_total` | counter | `method`, `code` (items of a request stream, each answered alone) |
| `splitserve_stage_duration_seconds` | histogram | `stage` (below) |
| `splitserve_batch_size` | histogram | (model_service) |
| `splitserve_queue_depth` | gauge | (model_service) rows waiting for a forward pass |
| `splitserve_generation_sequences` | gauge | (model_service) `state`: `running`, `waiting` |
| `splitserve_large_requests_waiting` | gauge | (preproc) requests waiting, untokenized, for model queue room |
| `splitserve_prompt_tokens_total` | counter | (model_service) `model`, `adapter`: prompt tokens of generations |
| `splitserve_generated_tokens_total` | counter | (model_service) `model`, `adapter` |
| `splitserve_time_to_first_token_seconds` | histogram | (model_service) `model`, `adapter` |
| `splitserve_time_per_output_token_seconds` | histogram | (model_service) `model`, `adapter` (1) |

Stages: preproc `tokenize` (`features` for audio), `hop` (its call to model_service), `postprocess`, `detokenize`
(generation); model_service `queue` (a row's or generation's wait), `forward`, `prefill`,
`decode`. (1): a finished generation's mean time between its output tokens.

`protocol` is `grpc` (method: `package.Service/Method`, code: the status name) or `http`
(method: the route, e.g. `POST /v1/chat/completions`, code: the HTTP status). The metrics
marked (model_service) or (preproc) are registered on first use, so preproc never exports them as
always-zero series.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from contextlib import contextmanager

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from splitserve_common import call_context

log = logging.getLogger(__name__)

# Latency buckets from 0.5 ms to 60 s: tokenizing is sub-millisecond, generation takes seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Health checks and reflection: neither counted nor logged as requests.
UNMEASURED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Inter-token latency: from a fraction of a millisecond (small models, GPU) to seconds.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _Lazy:
    """A metric registered on first use: a service exports only the series it can produce."""

    def __init__(self, kind, *args, **kwargs):
        self._make = lambda: kind(*args, **kwargs)
        self._metric = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        if self._metric is None:
            with self._lock:
                if self._metric is None:
                    self._metric = self._make()
        return getattr(self._metric, name)


REQUESTS = Counter("splitserve_requests_total", "calls finished, by protocol, method and status code",
                   ["protocol", "method", "code", "model", "adapter"])
REQUEST_DURATION = Histogram("splitserve_request_duration_seconds", "call duration, by protocol and method",
                             ["protocol", "method", "model", "adapter"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("splitserve_requests_in_flight", "calls being served now, by protocol and method",
                  ["protocol", "method"])
STREAM_ITEMS = Counter("splitserve_stream_items_total",
                       "items of request streams answered, each on its own, by method and status code",
                       ["method", "code"])
STAGE_DURATION = Histogram("splitserve_stage_duration_seconds",
                           "time spent per stage (tokenize, queue, forward, postprocess, hop, ...)",
                           ["stage"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = _Lazy(Histogram, "splitserve_batch_size", "rows per forward pass", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = _Lazy(Gauge, "splitserve_queue_depth", "rows waiting for a forward pass")
LARGE_REQUESTS_WAITING = _Lazy(Gauge, "splitserve_large_requests_waiting",
                               "large requests waiting, untokenized, for room in model_service's queue")
GENERATION_SEQUENCES = _Lazy(Gauge, "splitserve_generation_sequences", "generation requests by state",
                             ["state"])
PROMPT_TOKENS = _Lazy(Counter, "splitserve_prompt_tokens_total", "prompt tokens of generation requests",
                      ["model", "adapter"])
GENERATED_TOKENS = _Lazy(Counter, "splitserve_generated_tokens_total", "tokens generated", ["model", "adapter"])
TIME_TO_FIRST_TOKEN = _Lazy(Histogram, "splitserve_time_to_first_token_seconds",
                            "time from a generation request's arrival to its first token", ["model", "adapter"],
                            buckets=LATENCY_BUCKETS)
TIME_PER_OUTPUT_TOKEN = _Lazy(Histogram, "splitserve_time_per_output_token_seconds",
                              "a finished generation's mean time between output tokens", ["model", "adapter"],
                              buckets=TOKEN_BUCKETS)

_model = ""


def set_model(name: str) -> None:
    """The served model's name, the `model` label from now on."""
    global _model
    _model = name


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_DURATION.labels(stage).observe(seconds)
    if _stage_hook is not None:
        _stage_hook(stage, seconds)


_stage_hook = None


def set_stage_hook(hook) -> None:
    """`hook(stage, seconds)` also sees every stage (tracing turns each into a span)."""
    global _stage_hook
    _stage_hook = hook


def count_stream_item(method: str, code: str) -> None:
    STREAM_ITEMS.labels(method, code).inc()


def observe_batch_size(rows: int) -> None:
    BATCH_SIZE.observe(rows)


def set_queue_depth(depth: int) -> None:
    QUEUE_DEPTH.set(depth)


def set_large_requests_waiting(count: int) -> None:
    LARGE_REQUESTS_WAITING.set(count)


@contextmanager
def stage_timer(stage: str):
    """`with stage_timer("decode"): ...` records the block's wall time under that stage."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe_stage(stage, time.perf_counter() - start)


def set_generation_sequences(running: int, waiting: int) -> None:
    GENERATION_SEQUENCES.labels("running").set(running)
    GENERATION_SEQUENCES.labels("waiting").set(waiting)


def add_prompt_tokens(adapter: str, count: int) -> None:
    PROMPT_TOKENS.labels(_model, adapter).inc(count)


def add_generated_tokens(adapter: str, count: int) -> None:
    GENERATED_TOKENS.labels(_model, adapter).inc(count)


def observe_time_to_first_token(adapter: str, seconds: float) -> None:
    TIME_TO_FIRST_TOKEN.labels(_model, adapter).observe(seconds)


def observe_time_per_output_token(adapter: str, seconds: float) -> None:
    TIME_PER_OUTPUT_TOKEN.labels(_model, adapter).observe(seconds)


_serving_ports: dict[int, int] = {}


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int | None:
    """Serve /metrics over HTTP on a background thread; port 0 turns it off.

    Calling it again for the same port does nothing. A busy port is logged, not
    fatal: metrics are a side channel and must never stop the model from serving.
    Returns the bound port or None.
    """
    if not port:
        return None
    if port in _serving_ports:
        return _serving_ports[port]
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.error("metrics: cannot listen on %s:%d (%s); serving without metrics", host, port, exc)
        return None
    bound = server.server_address[1]
    _serving_ports[port] = bound
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


class HttpRequestMetrics:
    """The same three request metrics for one HTTP route, under protocol="http"."""

    def __init__(self, method: str):
        self.method = method
        self.in_flight = IN_FLIGHT.labels("http", method)

    def finish(self, start: float, status: int) -> None:
        self.in_flight.dec()
        REQUEST_DURATION.labels("http", self.method, _model, "").observe(time.perf_counter() - start)
        REQUESTS.labels("http", self.method, str(status), _model, "").inc()


def _short_method(full_method: str) -> str:
    """'/inference.GRPCInferenceService/ModelInfer' -> 'inference.GRPCInferenceService/ModelInfer'."""
    return full_method.lstrip("/")


def code_name(context, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # the aio context may report the raw integer
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name  # what grpc sends for an unhandled exception
    return grpc.StatusCode.OK.name


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of every call but health and reflection (UNMEASURED) with
    `wrap(behavior, full_method)`, kept per method: the base of the metrics, access-log and tracing
    interceptors."""

    def __init__(self, wrap):
        self._handlers = WrappedHandlers(wrap)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNMEASURED):
            return handler
        return self._handlers.get(handler_call_details.method, handler)


class MetricsInterceptor(ObservingInterceptor):
    """Counts every call by method and final status code, times it, and tracks calls in flight."""

    def __init__(self):
        super().__init__(lambda behavior, method: _measured(behavior, _short_method(method)))


def _measured(behavior, method: str):
    in_flight = IN_FLIGHT.labels("grpc", method)

    def enter(_request, _context) -> float:
        in_flight.inc()
        return time.perf_counter()

    def leave(start: float, context, exc: BaseException | None) -> None:
        in_flight.dec()
        code = code_name(context, exc)
        info = call_context.current()
        adapter = info.adapter if info is not None and code == "OK" else ""
        REQUEST_DURATION.labels("grpc", method, _model, adapter).observe(time.perf_counter() - start)
        REQUESTS.labels("grpc", method, code, _model, adapter).inc()

    return observed(behavior, enter, leave)


def observed(behavior, enter, leave, on_response=None):
    """`behavior` (a unary or response-streaming handler) run between `state = enter(request, context)`
    (a plain or coroutine function) and `leave(state, context, error)`, which sees the exception that
    ended the call, if any; `on_response(state, message)` sees each response message."""
    entered_async = inspect.iscoroutinefunction(enter)

    if inspect.isasyncgenfunction(behavior):

        async def streaming(request_or_iterator, context):
            state = await enter(request_or_iterator, context) if entered_async else enter(request_or_iterator, context)
            error = None
            try:
                async for item in behavior(request_or_iterator, context):
                    if on_response is not None:
                        on_response(state, item)
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                leave(state, context, error)

        return streaming

    async def unary(request_or_iterator, context):
        state = await enter(request_or_iterator, context) if entered_async else enter(request_or_iterator, context)
        error = None
        try:
            result = behavior(request_or_iterator, context)
            if inspect.isawaitable(result):
                result = await result
            if on_response is not None:
                on_response(state, result)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            leave(state, context, error)

    return unary


def wrap_handler(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behavior is `wrap(original_behavior)`."""
    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return factory(wrap(behavior), request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class WrappedHandlers:
    """`wrap_handler` results kept per method, so a call does not rebuild its handler.

    An entry is rebuilt when the handler underneath changes (an inner interceptor's refusal
    is a new handler for each call), so there is at most one entry per served method.
    `wrap(behavior, method)` returns the wrapped behavior.
    """

    def __init__(self, wrap):
        self._wrap = wrap
        self._by_method: dict[str, tuple] = {}  # method -> (handler, wrapped handler)

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        entry = self._by_method.get(method)
        if entry is None or entry[0] is not handler:
            entry = (handler, wrap_handler(handler, lambda behavior: self._wrap(behavior, method)))
            self._by_method[method] = entry
        return entry[1]
