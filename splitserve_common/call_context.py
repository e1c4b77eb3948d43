"""What is known about the request a task serves: its id, trace id, rows, tokens, adapter.

The outermost server interceptor (request_log.AccessLogInterceptor) opens a `RequestInfo`
for each call with `begin` and keeps it in a context variable for the call's task (and
the tasks it starts). From there:

- `outgoing_metadata()` is what a call made on its behalf (preproc -> model_service) sends
  along: the request id, and the W3C trace context when tracing is on;
- the metrics interceptor labels the call with its adapter;
- the access line reports it.

Rows and the adapter come from the request (`texts`, the first input's batch dimension
of a v2 tensor call, 1 for a generation; `adapter`, or the v2 `adapter` parameter),
tokens from the response (`usage`, a generation step's `generated_tokens`) or, for a v2
tensor call, the first input's elements. Request streams are not read.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from dataclasses import dataclass

REQUEST_ID_KEY = "x-request-id"
TRACEPARENT_KEY = "traceparent"
_VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")

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


def begin(method: str, request, metadata) -> tuple[RequestInfo, contextvars.Token]:
    """Open the call's RequestInfo from its invocation metadata and request; `end(token)` closes it."""
    request_id = trace_id = ""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            request_id = value
        elif key == TRACEPARENT_KEY and isinstance(value, str):
            match = _TRACEPARENT.fullmatch(value.strip())
            trace_id = match.group(1) if match else ""
    info = RequestInfo(method, request_id or uuid.uuid4().hex, trace_id)
    _safely(_describe_request, info, request)
    return info, _current.set(info)


def end(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a streaming call closed from another context (its caller went away)
        _current.set(None)


def describe_response(info: RequestInfo, response) -> None:
    _safely(_describe_response, info, response)


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """Metadata for a call made on behalf of the current request: its request id (and trace context)."""
    info = _current.get()
    pairs = [] if info is None else [(REQUEST_ID_KEY, info.request_id)]
    pairs.extend(_trace_headers())
    return tuple(pairs) or None


def current_trace_id() -> str:
    return _current_trace_id()


def set_trace_hooks(headers, trace_id) -> None:
    """Tracing's hooks: `headers()` -> [(key, value)] to send on, `trace_id()` -> the current trace id."""
    global _trace_headers, _current_trace_id
    _trace_headers, _current_trace_id = headers, trace_id


def _trace_headers() -> list[tuple[str, str]]:
    return []


def _current_trace_id() -> str:
    return ""


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
    """A side channel: a message it cannot read never fails the call."""
    try:
        describe(info, message)
    except Exception:  # noqa: BLE001
        log.debug("cannot describe %s", type(message).__name__, exc_info=True)


def _product(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total
