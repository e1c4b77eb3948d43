"""SIGTERM drains (issue 6, item 6): health flips to NOT_SERVING, new calls are refused,
in-flight calls finish, and the process exits within the grace period."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve_pb import generation_pb2, generation_pb2_grpc, preproc_pb2, preproc_pb2_grpc
from tests.ops_helpers import sentences, tiny_model
from tests.servers import model_service, preproc_service

# Generous: the process exits as soon as the calls in flight are done, so a long drain costs
# nothing, and a loaded CI machine may take a while to finish the streams.
DRAIN_SECONDS = 60.0
NEW_TOKENS = 64


def _refused_after(address: str, call, limit: float = 10.0) -> float | None:
    """Keep making fresh calls until one is refused with UNAVAILABLE; the time it was, or None."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                call(channel)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return time.monotonic()
                raise
        time.sleep(0.01)
    return None


def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_sigterm_finishes_in_flight_generation_and_refuses_new_calls():
    with model_service(tiny_model("gpt2"), "--drain-seconds", str(DRAIN_SECONDS)) as model, \
            grpc.insecure_channel(model.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        results: dict[int, dict] = {}
        started = threading.Barrier(5)

        def generate(i: int) -> None:
            request = generation_pb2.GenerateRequest(
                input_ids=[5 + i, 6, 7],
                settings=generation_pb2.GenerationSettings(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            tokens, last = [], None
            try:
                for n, step in enumerate(stub.Generate(request, timeout=120)):
                    if n == 0:
                        started.wait()
                    tokens.extend(step.token_ids)
                    last = step
                results[i] = {"tokens": len(tokens), "finish": last.finish_reason, "ended": time.monotonic()}
            except grpc.RpcError as exc:
                results[i] = {"error": exc.code()}

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        started.wait(timeout=60)  # every stream has its first token: all four are in flight
        model.proc.send_signal(signal.SIGTERM)

        # Health watchers hear NOT_SERVING, then their stream ends instead of holding the drain open.
        assert [reply.status for reply in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
        refused_at = _refused_after(model.address, lambda ch: generation_pb2_grpc.GenerationStub(ch).Stats(
            generation_pb2.GenerationStatsRequest(), timeout=5))
        for thread in threads:
            thread.join(timeout=120)
        code = _exit_code(model.proc, DRAIN_SECONDS + 10)

    assert refused_at is not None, "new calls were still accepted after SIGTERM"
    for i in range(4):
        assert "error" not in results[i], f"in-flight stream {i} failed: {results[i]}"
        assert results[i]["tokens"] == NEW_TOKENS
        assert results[i]["finish"] == generation_pb2.FINISH_REASON_LENGTH
    assert code == 0, f"model_service did not exit cleanly within the grace period:\n{model.log()[-3000:]}"


def test_sigterm_during_load_loses_no_accepted_request():
    model_dir = tiny_model("classifier")
    texts = sentences(16)
    with model_service(model_dir) as model, \
            preproc_service(model_dir, model.address, "--drain-seconds", str(DRAIN_SECONDS)) as preproc:
        outcomes: list[str] = []
        details: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        warmed = threading.Barrier(5)

        def client(worker: int) -> None:
            with grpc.insecure_channel(preproc.address) as channel:
                stub = preproc_pb2_grpc.PreprocStub(channel)
                for n in range(400):  # bounded: the load stops by itself
                    if stop.is_set():
                        return
                    try:
                        reply = stub.Classify(preproc_pb2.ClassifyRequest(texts=texts[n % 16:n % 16 + 4]), timeout=30)
                        outcome = "OK" if len(reply.results) == len(texts[n % 16:n % 16 + 4]) else "WRONG"
                    except grpc.RpcError as exc:
                        outcome = exc.code().name
                        if outcome not in ("OK", "UNAVAILABLE"):
                            details.append(f"{outcome}: {exc.details()}")
                    with lock:
                        outcomes.append(outcome)
                    if n == 2:
                        warmed.wait(timeout=60)
                    if outcome == "UNAVAILABLE":
                        return  # refused: the server is going away

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        warmed.wait(timeout=60)  # all four clients are sending
        preproc.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        stop.set()
        code = _exit_code(preproc.proc, DRAIN_SECONDS + 10)

    # Every call either completed with a full answer or was refused up front (UNAVAILABLE, which a
    # client may retry elsewhere); none was accepted and then lost (CANCELLED, INTERNAL, ...).
    assert outcomes.count("OK") >= 12
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, details
    assert outcomes.count("UNAVAILABLE") == 4  # each client stopped at its first refusal
    assert code == 0, f"preproc did not exit cleanly within the grace period:\n{preproc.log()[-3000:]}"
