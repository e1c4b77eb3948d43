"""One access line per request, the request id, and the log format (text or JSON).

`AccessLogInterceptor` (installed by `serving.create_server` as the outermost interceptor,
so calls refused for a missing token or while draining are logged too) does, per call:

- takes the request id from the caller's `x-request-id` metadata (visible ASCII, at most
  128 characters), or makes one up, and returns it in the response's initial metadata;
- keeps it, with the trace id, in a context variable for the call's task:
  `outgoing_metadata()` is what a call made on its behalf (preproc -> model_service) sends
  along, so both services log the same request id;
- logs one line on the `splitserve.access` logger when the call ends: method, status
  code, duration, rows, tokens, adapter, request id, trace id. Rows and the adapter come
  from the request (`texts`, the first input's batch dimension, `adapter` or the v2
  `adapter` parameter), tokens from the response (`usage.completion_tokens`, a generation
  step's `generated_tokens`) or, for a v2 tensor call, the first input's elements.

Health checks and reflection are not logged. `--log-format json` turns every log record
into one JSON object per line; an access line's fields are top-level keys there.
"""

from __future__ import annotations

import contextvars
import datetime
import inspect
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass

import grpc

from splitserve_common.metrics import WrappedHandlers, code_name

REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"
UNLOGGED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")

access_log = logging.getLogger("splitserve.access")
log = logging.getLogger(__name__)


@dataclass
class RequestInfo:
    method: str
    request_id: str
    trace_id: str = ""
    code: str = ""
    duration_ms: float = 0.0
    rows: int | None = None
    tokens: int | None = None
    adapter: str = ""


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("splitserve_request", default=None)


def current() -> RequestInfo | None:
    """The request this task serves, when it serves one."""
    return _current.get()


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata for a call made on behalf of the current request: its request id (and trace context)."""
    info = _current.get()
    pairs = [] if info is None else [(REQUEST_ID_KEY, info.request_id)]
    pairs.extend(_trace_headers())
    return tuple(pairs) or None


def _trace_headers() -> list[tuple[str, str]]:
    """W3C trace context of the current span; replaced by splitserve_common.tracing when tracing is on."""
    return []


def set_trace_hooks(headers, trace_id) -> None:
    """Tracing's hooks: `headers()` -> [(key, value)] to send on, `trace_id()` -> the current trace id."""
    global _trace_headers, _current_trace_id
    _trace_headers, _current_trace_id = headers, trace_id


def _current_trace_id() -> str:
    return ""


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self._handlers = WrappedHandlers(lambda behavior, method: _logged(behavior, method.lstrip("/")))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNLOGGED):
            return handler
        return self._handlers.get(handler_call_details.method, handler)


def _begin(method: str, request, context) -> RequestInfo:
    request_id = trace_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            request_id = value
        elif key == TRACEPARENT_KEY and isinstance(value, str):
            match = _TRACEPARENT.fullmatch(value.strip())
            trace_id = match.group(1) if match else ""
    info = RequestInfo(method, request_id or uuid.uuid4().hex, trace_id)
    _safely(_describe_request, info, request)
    return info


def _describe_request(info: RequestInfo, request) -> None:
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", None)
    if not fields:
        return  # a request stream: its items are the servicer's business
    if "texts" in fields:
        info.rows = len(request.texts)
    elif "inputs" in fields and request.inputs:  # Open Inference Protocol v2
        shape = list(request.inputs[0].shape)
        info.rows = shape[0] if shape else 1
        info.tokens = _product(shape)
    elif "prompt" in fields or "messages" in fields or "input_ids" in fields:  # one generation
        info.rows = 1
    if "adapter" in fields:
        info.adapter = request.adapter
    elif "parameters" in fields and "inputs" in fields and "adapter" in request.parameters:
        info.adapter = request.parameters["adapter"].string_param


def _describe_response(info: RequestInfo, response) -> None:
    fields = getattr(getattr(response, "DESCRIPTOR", None), "fields_by_name", None)
    if not fields:
        return
    if "usage" in fields and response.HasField("usage"):
        usage = response.usage
        counted = usage.DESCRIPTOR.fields_by_name
        for name in ("completion_tokens", "total_tokens", "prompt_tokens"):  # generated, else what was read
            if name in counted:
                info.tokens = getattr(usage, name)
                break
    elif "generated_tokens" in fields:
        info.tokens = response.generated_tokens


def _safely(describe, info: RequestInfo, message) -> None:
    """The access line is a side channel: a message it cannot read never fails the call."""
    try:
        describe(info, message)
    except Exception:  # noqa: BLE001
        log.debug("access line: cannot describe %s", type(message).__name__, exc_info=True)


def _product(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def _finish(info: RequestInfo, context, start: float, error: BaseException | None) -> None:
    info.duration_ms = round((time.perf_counter() - start) * 1e3, 3)
    info.code = code_name(context, error)
    info.trace_id = _current_trace_id() or info.trace_id
    if access_log.isEnabledFor(logging.INFO):
        access_log.info("%s %s %.1f ms rows=%s tokens=%s adapter=%s request_id=%s trace_id=%s", info.method,
                        info.code, info.duration_ms, _dash(info.rows), _dash(info.tokens), info.adapter or "-",
                        info.request_id, info.trace_id or "-", extra={"access": asdict(info)})


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _logged(behavior, method: str):
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request_or_iterator, context):
            start = time.perf_counter()
            info = _begin(method, request_or_iterator, context)
            token = _current.set(info)
            error = None
            try:
                await context.send_initial_metadata(((REQUEST_ID_KEY, info.request_id),))
                async for item in behavior(request_or_iterator, context):
                    _safely(_describe_response, info, item)
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                _current.reset(token)
                _finish(info, context, start, error)

        return streaming

    async def unary(request_or_iterator, context):
        start = time.perf_counter()
        info = _begin(method, request_or_iterator, context)
        token = _current.set(info)
        error = None
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, info.request_id),))
            result = behavior(request_or_iterator, context)
            if inspect.isawaitable(result):
                result = await result
            _safely(_describe_response, info, result)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            _current.reset(token)
            _finish(info, context, start, error)

    return unary


# ---------------------------------------------------------------- log format

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                     timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "access", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
