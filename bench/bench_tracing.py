"""What tracing costs: text-classification through client -> preproc -> model_service with
tracing off and with every span exported over OTLP/gRPC, same run (issue 14, item 1).

    python bench/bench_tracing.py [SENTENCES] [--concurrency 32] [--limit 256] [--rounds 3]

Two pairs of services on the real all-MiniLM-L6-v2 body (bench_ops.build_model), one started
with no OTEL_* variables, one with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP receiver
running in a separate process (it accepts and counts the spans, as a collector would). Both
pairs run at once and the rounds interleave them; medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ops import DEFAULT_SENTENCES, build_model, measure, wait_serving  # noqa: E402
from splitserve_common.channels import ChannelSecurity  # noqa: E402
from tests import servers  # noqa: E402


def serve_spans(port: int, receive) -> None:
    """An OTLP/gRPC trace receiver on `port` that calls `receive(spans)` with each export's spans; runs
    until its process ends (start it in a process of its own)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            receive([span for r in request.resource_spans for s in r.scope_spans for span in s.spans])
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def run_receiver(port: int, counted) -> None:
    """An OTLP/gRPC trace receiver that counts what it is sent (its own process)."""
    def count(spans):
        with counted.get_lock():
            counted.value += len(spans)

    serve_spans(port, count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", type=Path, default=DEFAULT_SENTENCES)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sentences = [s.strip() for s in args.sentences.read_text().splitlines() if s.strip()][:args.limit]
    receiver_port = servers.free_port()
    counted = multiprocessing.Value("q", 0)
    receiver = multiprocessing.Process(target=run_receiver, args=(receiver_port, counted), daemon=True)
    receiver.start()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    security = ChannelSecurity()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
            model_dir, _, _ = build_model(Path(tmp))
            addresses = {}
            for name, env in (("tracing off", {}), ("tracing exported (OTLP)", otel)):
                m = stack.enter_context(servers.service(
                    "model_service", ["--model-dir", str(model_dir), "--metrics-port", "0"], env=env, wait=False))
                wait_serving(m, security)
                p = stack.enter_context(servers.service(
                    "preproc_service", ["--model-dir", str(model_dir), "--model-service", m.address,
                                        "--metrics-port", "0"], env=env, wait=False))
                wait_serving(p, security)
                addresses[name] = p.address
            results: dict[str, list[dict]] = {}
            for round_number in range(args.rounds):
                for name, address in addresses.items():
                    results.setdefault(name, []).append(
                        asyncio.run(measure(address, security, sentences, args.concurrency)))
                print(f"round {round_number + 1} done", file=sys.stderr)
            time.sleep(6)  # the batch span processors export every 5 s
    finally:
        receiver.terminate()
    rates = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
    print(f"{len(sentences)} sentences, concurrency {args.concurrency}, median of {args.rounds} interleaved "
          f"rounds; the receiver got {counted.value} spans")
    print()
    print("| configuration | sentences/s | p50 ms | vs tracing off |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        p50 = statistics.median(r["p50_ms"] for r in runs)
        print(f"| {name} | {rates[name]:.1f} | {p50:.2f} | {rates[name] / rates['tracing off']:.2f} |")


if __name__ == "__main__":
    main()
