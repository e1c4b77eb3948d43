"""OpenTelemetry tracing across the hop (issue 14, item 1): both services export to an OTLP
receiver run by the test (the collector's gRPC TraceService), configured only by OTEL_*
variables; one trace covers client -> preproc -> model_service with the stage spans in order."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from splitserve_common import tracing
from splitserve_pb import preproc_pb2, preproc_pb2_grpc
from tests.ops_helpers import sentences, tiny_model
from tests.servers import model_service, preproc_service

CLASSIFY = "splitserve.v1.Preproc/Classify"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span with its service's name."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                            "attributes": {a.key: a.value for a in span.attributes}})
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str, wanted: int, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if len(found) >= wanted:
                return found
            time.sleep(0.1)
        return found


@pytest.fixture(scope="module")
def traced_stack():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    model_dir = tiny_model("classifier")
    try:
        with model_service(model_dir, "--metrics-port", "0", env=env) as model, \
                preproc_service(model_dir, model.address, "--metrics-port", "0",
                                env={**env, "OTEL_SERVICE_NAME": "preproc"}) as preproc, \
                grpc.insecure_channel(preproc.address) as channel:
            yield {"receiver": receiver, "stub": preproc_pb2_grpc.PreprocStub(channel), "preproc": preproc}
    finally:
        server.stop(0)


def _children(spans, parent):
    return sorted((s for s in spans if s["parent"] == parent["span_id"]), key=lambda s: s["start"])


def test_one_trace_across_both_services_with_stage_spans_in_order(traced_stack):
    metadata = (("traceparent", f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"), ("x-request-id", "traced-1"))
    traced_stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=sentences(3)), timeout=30, metadata=metadata)
    spans = traced_stack["receiver"].trace(CALLER_TRACE, wanted=7)
    by_name = {s["name"]: s for s in spans}
    # The caller's trace continues in preproc (child of the caller's span) and in model_service.
    root = by_name[CLASSIFY]
    assert root["service"] == "preproc" and root["parent"] == "00f067aa0ba902b7"
    assert root["attributes"]["splitserve.request_id"].string_value == "traced-1"
    assert root["attributes"]["rpc.grpc.status_code"].int_value == 0
    assert [s["name"] for s in _children(spans, root) if s["service"] == "preproc"] == [
        "tokenize", "hop", "postprocess"]
    model = by_name[MODEL_INFER]
    assert model["service"] == "model_service" and model["parent"] == root["span_id"]
    hop = by_name["hop"]
    assert hop["start"] <= model["start"] and model["end"] <= hop["end"]  # the model call inside preproc's hop
    assert [s["name"] for s in _children(spans, model)] == ["queue", "forward"]
    queue, forward = _children(spans, model)
    assert model["start"] <= queue["start"] <= queue["end"] <= forward["start"] <= forward["end"] <= model["end"]
    # The access line carries the same trace id.
    deadline = time.monotonic() + 30
    while "trace_id=" + CALLER_TRACE not in traced_stack["preproc"].log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"request_id=traced-1 trace_id={CALLER_TRACE}" in traced_stack["preproc"].log()


def test_a_call_without_trace_context_starts_its_own_trace(traced_stack):
    traced_stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=["the river"]), timeout=30,
                                  metadata=(("x-request-id", "traced-2"),))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        roots = [s for s in traced_stack["receiver"].spans if s["name"] == CLASSIFY
                 and s["attributes"]["splitserve.request_id"].string_value == "traced-2"]
        if roots:
            break
        time.sleep(0.1)
    assert len(roots) == 1 and roots[0]["parent"] == ""
    spans = traced_stack["receiver"].trace(roots[0]["trace_id"], wanted=7)
    assert {s["service"] for s in spans} == {"preproc", "model_service"}


def test_tracing_is_off_unless_configured():
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_SERVICE_NAME": "x"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "console"})
    if not tracing.enabled:  # this process never set it up: nothing is installed
        assert tracing.server_interceptors() == []
        assert tracing.current_context() is None
