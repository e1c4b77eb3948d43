"""Access lines and the request id across the hop (issue 14, item 2): both services run with
`--log-format json`; a request id given by the caller, or made up (then it comes back in the response
metadata), appears in one access line on each service, with the fields the issue lists."""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest

from client.preproc_client import PreprocClient
from splitserve_pb import generation_pb2, generation_pb2_grpc, preproc_pb2, preproc_pb2_grpc
from tests.ops_helpers import sentences, tiny_model
from tests.servers import model_service, preproc_service

CLASSIFY = "splitserve.v1.Preproc/Classify"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def stack():
    model_dir = tiny_model("classifier")
    with model_service(model_dir, "--metrics-port", "0", "--log-format", "json") as model, \
            preproc_service(model_dir, model.address, "--metrics-port", "0", "--log-format", "json") as preproc, \
            grpc.insecure_channel(preproc.address) as channel:
        yield {"stub": preproc_pb2_grpc.PreprocStub(channel), "model": model, "preproc": preproc}


def access_lines(service) -> list[dict]:
    """The JSON access lines of a service's log (other output, e.g. progress bars, is not a log record)."""
    records = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    return [r for r in records if r["logger"] == "splitserve.access"]


def _one(service, request_id: str, method: str) -> dict:
    """The access line of this request. A refused call's status may reach the caller a moment before
    the server writes its line (grpc sends an abort's status at once), so wait a little for it."""
    deadline = time.monotonic() + 30
    while True:
        found = [r for r in access_lines(service) if r["request_id"] == request_id and r["method"] == method]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, (request_id, method, access_lines(service))
            return found[0]
        time.sleep(0.05)


def test_request_id_round_trip_and_json_access_lines(stack):
    texts = sentences(3)
    request_id = "req-abc-123"
    reply, call = stack["stub"].Classify.with_call(
        preproc_pb2.ClassifyRequest(texts=texts), timeout=30,
        metadata=(("x-request-id", request_id), ("traceparent", TRACEPARENT)))
    assert len(reply.results) == 3
    # The caller's own id is not sent back (issue 13: a separate metadata send on every call of each hop).
    assert "x-request-id" not in dict(call.initial_metadata())

    preproc_line = _one(stack["preproc"], request_id, CLASSIFY)
    assert preproc_line["code"] == "OK" and preproc_line["rows"] == 3 and preproc_line["adapter"] == ""
    assert preproc_line["trace_id"] == TRACE_ID and preproc_line["level"] == "INFO"
    assert 0 < preproc_line["duration_ms"] < 30_000
    # The same id reached model_service with the call preproc made for this request.
    model_line = _one(stack["model"], request_id, MODEL_INFER)
    assert model_line["code"] == "OK" and model_line["rows"] == 3
    assert model_line["tokens"] % 3 == 0 and model_line["tokens"] >= 3 * 3  # rows x padded length
    assert model_line["duration_ms"] <= preproc_line["duration_ms"]


class _SentMetadata(grpc.UnaryUnaryClientInterceptor):
    """Records the metadata of each unary call a channel sends."""

    def __init__(self):
        self.sent: list[dict] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.sent.append(dict(client_call_details.metadata or ()))
        return continuation(client_call_details, request)


def test_the_sdk_sends_a_request_id_of_its_own_with_each_call(stack):
    """Issue 13: a service sends back an id it made up as initial metadata of its own (one more frame per
    call), so the SDK names each call itself; both services log that id."""
    recorder = _SentMetadata()
    channel = grpc.intercept_channel(grpc.insecure_channel(stack["preproc"].address), recorder)
    with PreprocClient(timeout=30, channel=channel) as client:
        client.classify(["the river"])
        client.classify(["the sea"])
    ids = [sent.get("x-request-id") for sent in recorder.sent]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1], recorder.sent
    for request_id in ids:
        assert _one(stack["preproc"], request_id, CLASSIFY)["rows"] == 1
        assert _one(stack["model"], request_id, MODEL_INFER)["rows"] == 1


def test_request_id_is_made_up_when_missing_or_unusable(stack):
    made_up = []
    for metadata in ((), (("x-request-id", "x" * 200),), (("x-request-id", "two words"),)):
        _, call = stack["stub"].Classify.with_call(preproc_pb2.ClassifyRequest(texts=["the river"]), timeout=30,
                                                   metadata=metadata)
        request_id = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        made_up.append(request_id)
        assert _one(stack["preproc"], request_id, CLASSIFY)["trace_id"] == ""
        assert _one(stack["model"], request_id, MODEL_INFER)["rows"] == 1
    assert len(set(made_up)) == 3


def test_failed_calls_are_logged_with_their_code_and_health_is_not(stack):
    with pytest.raises(grpc.RpcError) as failure:
        stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=["a"], top_k=-3), timeout=30,
                               metadata=(("x-request-id", "bad-one"),))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" not in dict(failure.value.initial_metadata())  # the caller's own: not sent back
    line = _one(stack["preproc"], "bad-one", CLASSIFY)
    assert line["code"] == "INVALID_ARGUMENT"
    assert not [r for r in access_lines(stack["model"]) if r["request_id"] == "bad-one"]  # refused before the hop
    # The readiness checks the fixture made are not requests.
    for service in ("preproc", "model"):
        assert not [r for r in access_lines(stack[service]) if "grpc.health" in r["method"]]
    # Every record of the service's own loggers is JSON.
    assert any(r["logger"] == "preproc_service" and "SERVING" in r["message"]
               for r in map(json.loads, filter(lambda s: s.startswith("{"), stack["preproc"].log().splitlines())))


def test_generation_line_counts_tokens_and_text_format_is_the_default():
    with model_service(tiny_model("gpt2"), "--metrics-port", "0") as model, \
            grpc.insecure_channel(model.address) as channel:
        request = generation_pb2.GenerateRequest(
            input_ids=[5, 6, 7], settings=generation_pb2.GenerationSettings(max_new_tokens=4, ignore_eos=True))
        steps = list(generation_pb2_grpc.GenerationStub(channel).Generate(
            request, timeout=60, metadata=(("x-request-id", "gen-1"),)))
        assert sum(len(step.token_ids) for step in steps) == 4
    log = model.log()  # after the stop: every line written
    line = next(line for line in log.splitlines() if "request_id=gen-1" in line)
    assert re.search(r"splitserve\.access: splitserve\.v1\.Generation/Generate OK [\d.]+ ms rows=1 tokens=4 "
                     r"adapter=- request_id=gen-1 trace_id=-$", line), line


@pytest.mark.server
def test_the_access_line_is_written_after_the_answer_is_handed_to_grpc():
    """Formatting and writing a line cost ~0.1 ms after an idle pause, on every hop's path (issue 13): the
    line is written on the event loop's next turn, outside the call's task, once grpc.aio has the answer."""
    import asyncio
    import logging

    from splitserve_common.request_log import AccessLogInterceptor, access_log

    written = []

    class Recorder(logging.Handler):
        def emit(self, record):
            written.append((record.getMessage(), asyncio.current_task()))

    async def echo(request: bytes, context) -> bytes:
        return request

    async def run():
        server = grpc.aio.server(interceptors=[AccessLogInterceptor()])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                say = channel.unary_unary("/test.Echo/Say")
                return await say(b"hi", timeout=30, metadata=(("x-request-id", "echo-1"),))
        finally:
            await server.stop(None)

    recorder = Recorder()
    access_log.addHandler(recorder)
    level = access_log.level
    access_log.setLevel(logging.INFO)
    try:
        assert asyncio.run(run()) == b"hi"
    finally:
        access_log.removeHandler(recorder)
        access_log.setLevel(level)
    [(message, task)] = [(m, t) for m, t in written if "request_id=echo-1" in m]
    assert message.startswith("test.Echo/Say OK ")
    assert task is None, f"written inside the call's task {task}, before its answer went out"
