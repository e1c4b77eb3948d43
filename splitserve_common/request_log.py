"""One access line per request, the request id, and the log format (text or JSON).

`AccessLogInterceptor` (installed by `serving.create_server` as the outermost interceptor,
so calls refused for a missing token or while draining are logged too) does, per call:

- takes the request id from the caller's `x-request-id` metadata (visible ASCII, at most
  128 characters), or makes one up and returns it in the response's initial metadata (the
  caller's own is not sent back: grpc.aio sends initial metadata set by the handler as a batch
  of its own, before the response, which cost ~0.1 ms per call and hop here; issue 13);
- keeps it, with the trace id, rows, tokens and adapter, for the call's task
  (call_context.py): preproc's calls to model_service carry the same request id;
- logs one line on the `splitserve.access` logger when the call ends: method, status
  code, duration, rows, tokens, adapter, request id, trace id; written on the event loop's next
  turn, once grpc.aio has the answer (`_after_answer`).

Health checks and reflection are not logged. `--log-format json` turns every log record
into one JSON object per line; an access line's fields are top-level keys there.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import time

from splitserve_common import call_context, tracing
from splitserve_common.call_context import REQUEST_ID_KEY
from splitserve_common.metrics import ObservingInterceptor, code_name, observed

access_log = logging.getLogger("splitserve.access")


class AccessLogInterceptor(ObservingInterceptor):
    def __init__(self):
        super().__init__(lambda behavior, method: _logged(behavior, method.lstrip("/")))


def _logged(behavior, method: str):
    async def enter(request, context):
        start = time.perf_counter()
        metadata = context.invocation_metadata()
        info, token = call_context.begin(method, request, metadata)
        if (REQUEST_ID_KEY, info.request_id) not in (metadata or ()):  # made up here: the caller learns it
            try:
                await context.send_initial_metadata(((REQUEST_ID_KEY, info.request_id),))
            except BaseException:
                call_context.end(token)
                raise
        return start, info, token

    def leave(state, context, error: BaseException | None) -> None:
        start, info, token = state
        call_context.end(token)
        info.duration_ms = round((time.perf_counter() - start) * 1e3, 3)
        info.code = code_name(context, error)
        info.trace_id = call_context.current_trace_id() or info.trace_id
        tracing.annotate(info)
        if access_log.isEnabledFor(logging.INFO):
            _after_answer(functools.partial(
                access_log.info, "%s %s %.1f ms rows=%s tokens=%s adapter=%s request_id=%s trace_id=%s", info.method,
                info.code, info.duration_ms, _dash(info.rows), _dash(info.tokens), info.adapter or "-",
                info.request_id, info.trace_id or "-", extra={"access": _fields(info)}))

    return observed(behavior, enter, leave, lambda state, message: call_context.describe_response(state[1], message))


def _after_answer(write) -> None:
    """Run `write` once the call's answer is on its way: on the event loop's next turn, as grpc.aio hands the
    response to its transport in the same turn the handler returns. Formatting and writing a line cost
    ~0.1 ms after an idle pause on the 2-core machine, on each hop's path (issue 13); lines keep their order."""
    try:
        asyncio.get_running_loop().call_soon(write)
    except RuntimeError:  # no event loop: nothing to overtake
        write()


def _fields(info: call_context.RequestInfo) -> dict:
    """The access line's fields: RequestInfo's own (all plain values, so a shallow copy; dataclasses.asdict
    copies recursively and cost ~15x as much, on every call)."""
    return dict(vars(info))


def _dash(value) -> str:
    return "-" if value is None else str(value)


class HttpAccess:
    """The HTTP doors' side of this module (splitserve_common.http_front): the same request id
    (the caller's `x-request-id` header, or a new one) for the request and the calls made on its
    behalf, and the same access line, its code being the HTTP status."""

    def __init__(self, method: str, request_id: str = "", traceparent: str = ""):
        self.info, self._token = call_context.begin(
            method, None, [(REQUEST_ID_KEY, request_id), (call_context.TRACEPARENT_KEY, traceparent)])
        self._start = time.perf_counter()

    def finish(self, status: int) -> None:
        call_context.end(self._token)
        info = self.info
        info.duration_ms = round((time.perf_counter() - self._start) * 1e3, 3)
        info.code = str(status)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %.1f ms request_id=%s trace_id=%s", info.method, info.code, info.duration_ms,
                            info.request_id, info.trace_id or "-", extra={"access": _fields(info)})


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
