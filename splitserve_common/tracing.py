"""OpenTelemetry tracing across the preproc -> model_service hop, configured by the standard
OTEL_* environment variables.

Off unless an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names an exporter
(`otlp`, `console`), and never with `OTEL_SDK_DISABLED=true`. Off, nothing here is imported
or installed: no interceptor, no span, one boolean test per stage.

On (`setup`, called by `serving.create_server`):

- a TracerProvider with the SDK's batch span processor and the OTLP/gRPC exporter, both
  configured by their OTEL_* variables (endpoint, headers, TLS, timeouts, batch sizes);
  `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (default: the
  service's own name), `OTEL_TRACES_SAMPLER` picks the sampler;
- `TracingInterceptor` opens a SERVER span per RPC (health and reflection aside) whose
  parent is the caller's W3C `traceparent`, with rpc.* attributes, the status code and
  the request id;
- the calls made on a request's behalf (preproc -> model_service) carry the current span's
  `traceparent` (call_context.outgoing_metadata), so one trace covers both services;
- each stage a service measures for Prometheus (metrics.observe_stage: tokenize, hop,
  postprocess, detokenize on preproc) becomes a child span of the request's span, and
  model_service's batcher adds each request's `queue` and `forward` spans (`record_span`).

The opentelemetry-instrumentation-grpc package is not used: its grpc.aio server
interceptor would be a second wrapper around every call and knows none of the stages.
"""

from __future__ import annotations

import logging
import os
import time

import grpc

from splitserve_common import call_context, metrics

log = logging.getLogger(__name__)

enabled = False
_tracer = None
_otel = None  # the opentelemetry modules, imported by setup


def configured(environ=os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str, exporter=None) -> bool:
    """Start tracing when configured (or when an `exporter` is given, as tests do); True when on."""
    global enabled, _tracer
    if enabled:
        return True
    if exporter is None and not configured():
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter is None:
        if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}).merge(
        OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("splitserve")
    _import_api()
    call_context.set_trace_hooks(_trace_headers, _trace_id)
    metrics.set_stage_hook(record_stage)
    enabled = True
    log.info("tracing on: service %s, exporter %s", service_name, type(exporter).__name__)
    return True


def _import_api() -> None:
    global _otel
    from types import SimpleNamespace

    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    _otel = SimpleNamespace(context=context, propagate=propagate, trace=trace, SpanKind=SpanKind, Status=Status,
                            StatusCode=StatusCode)


def shutdown() -> None:
    """Export what is left (the batch processor flushes on shutdown)."""
    if enabled:
        _otel.trace.get_tracer_provider().shutdown()


def _trace_headers() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    _otel.propagate.inject(carrier)
    return list(carrier.items())


def _trace_id() -> str:
    span_context = _otel.trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def record_stage(stage: str, seconds: float) -> None:
    """A child span of the current request's span for a stage that just ended."""
    end = time.time_ns()
    record_span(stage, end - int(seconds * 1e9), end)


def current_context():
    """The current trace context, to parent spans recorded later elsewhere (None when off)."""
    return _otel.context.get_current() if enabled else None


def record_span(name: str, start_ns: int, end_ns: int, parent=None, attributes=None) -> None:
    """A finished span under `parent` (a context from current_context), or under the current span."""
    if not enabled:
        return
    if parent is None and not _otel.trace.get_current_span().get_span_context().is_valid:
        return  # not inside a traced request
    span = _tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)


def annotate(info: call_context.RequestInfo) -> None:
    """The request id (and adapter) on the current request's span."""
    if enabled:
        span = _otel.trace.get_current_span()
        span.set_attribute("splitserve.request_id", info.request_id)
        if info.adapter:
            span.set_attribute("splitserve.adapter", info.adapter)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """[TracingInterceptor()] when tracing is on, else []."""
    return [TracingInterceptor()] if enabled else []


class TracingInterceptor(metrics.ObservingInterceptor):
    """A SERVER span per call (health and reflection aside), child of the caller's W3C trace context."""

    def __init__(self):
        super().__init__(_traced)


def _traced(behavior, full_method: str):
    method = full_method.lstrip("/")
    service, _, rpc = method.partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}

    def enter(_request, context):
        parent = _otel.propagate.extract({k: v for k, v in (context.invocation_metadata() or ())
                                          if isinstance(v, str)})
        span = _tracer.start_span(method, context=parent, kind=_otel.SpanKind.SERVER, attributes=attributes)
        return span, _otel.context.attach(_otel.trace.set_span_in_context(span))

    def leave(state, context, error) -> None:
        span, token = state
        code = metrics.code_name(context, error)
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code != "OK":
            span.set_status(_otel.Status(_otel.StatusCode.ERROR, code))
        span.end()
        _otel.context.detach(token)

    return metrics.observed(behavior, enter, leave)
