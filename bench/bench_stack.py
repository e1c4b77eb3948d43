"""The whole stack (client -> preproc_service -> model_service) against the in-process limit, one run.

    python bench/bench_stack.py [SENTENCES] [--limit 1000] [--concurrency 1,8,32] [--paired 200]
                                [--model-args "..."] [--model-env K=V,...] [--preproc-args "..."]

Every part runs with its default settings on the same cores (this process is the client). The model
is the real all-MiniLM-L6-v2 body with a seeded 3-label classification head, saved in the MLflow
components layout; SENTENCES defaults to the shared benchmark sentences (tests.ops_helpers), one
sentence per request. Rows of the table:

- in-process limit: tokenize all sentences, then eager forward passes over length-sorted batches
  (`--batch-size`), in this process with torch's default threads or one thread, whichever is faster;
  measured before and after the services run, the mean is the limit every other row is a ratio to;
- in-process, the service's engine: the same sorted batches through model_service's own forward
  (`backends.EagerBackend`: padding-free for BERT, linear products on oneDNN), one and two threads,
  the faster: how much of the stack's ratio is the engine's kernels rather than the serving around them;
- in-process pipeline: `pipeline("text-classification")` with torch's default threads or one, whichever makes a
  one-sentence call faster here (`pipeline_threads`), one call per
  sentence (its answers are the reference every answer through the services is checked against);
- the stack at each concurrency: N asyncio callers, one sentence per Classify call.

CPU-s per 1,000 requests: user + system time of each service process (/proc/<pid>/stat, every thread)
and of this process (the client, or the in-process reference) over the phase. At concurrency 1 the
added latency is measured paired (`paired_single_calls`): sentence by sentence, a pipeline call, a
call through the services and a bare gRPC round trip (health Check on preproc_service) in rotating
order; target: median added latency <= two round trips + 1 ms (the path makes two hops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench.bench_model_infer import cpu_seconds, padded_batches  # noqa: E402
from bench.bench_ops import build_model  # noqa: E402  (MiniLM body + seeded 3-label head, MLflow layout)
from client.preproc_client import AsyncPreprocClient, PreprocClient  # noqa: E402
from tests import servers  # noqa: E402
from tests.ops_helpers import SHARED_SENTENCES, read_sentences  # noqa: E402

SCORE_TOLERANCE = 1e-4  # batched and padded vs one-row float32 forwards differ in the last bits


class CpuMeter:
    """CPU-s used by named processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> tuple[float, dict[str, float]]:
        elapsed = time.perf_counter() - self._t0
        return elapsed, {name: cpu_seconds(pid) - self._cpu0[name] for name, pid in self.pids.items()}


def in_process_limit(model, tokenizer, sentences: list[str], batch_size: int, forward=None) -> dict:
    """Tokenize every sentence, then forward length-sorted batches: the most any server could do here.
    Measured with torch's default thread count and with one thread (on a busy machine spinning OpenMP
    threads can make the default slower); the faster is the limit."""
    import torch

    default = torch.get_num_threads()
    best = None
    for threads in sorted({default, 1}, reverse=True):
        torch.set_num_threads(threads)
        try:
            measured = _sorted_forwards(model, tokenizer, sentences, batch_size, forward) | {"threads": threads}
        finally:
            torch.set_num_threads(default)
        best = measured if best is None or measured["rate"] > best["rate"] else best
    return best


def _sorted_forwards(model, tokenizer, sentences: list[str], batch_size: int, forward=None) -> dict:
    import torch

    forward = forward or (lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)
    meter = CpuMeter({"client": os.getpid()})
    meter.start()
    rows = sorted(tokenizer(sentences, truncation=True)["input_ids"], key=len)
    with torch.inference_mode():
        for ids, mask in padded_batches(rows, batch_size):
            forward(ids, mask).softmax(-1).numpy()
    elapsed, cpu = meter.stop()
    return {"rate": len(rows) / elapsed, "cpu": cpu}


def engine_forward(model):
    """model_service's eager backend (backends.EagerBackend) on this model: forward(ids, mask) -> logits."""
    from types import SimpleNamespace

    from model_service.backends import EagerBackend

    backend = EagerBackend(SimpleNamespace(model=model))
    return lambda ids, mask: backend({"input_ids": ids, "attention_mask": mask})["logits"]


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pipeline_threads(pipe, sentences: list[str]) -> int:
    """torch's default thread count or 1, whichever makes one-sentence pipeline calls faster (median) here: on
    a busy machine two spinning OpenMP threads made each call ~60x slower (a 1 s median on 2 shared cores),
    so the reference the services' added latency is measured against would be a broken one."""
    import torch

    best = None
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        with torch_threads(threads):
            times = []
            for sentence in sentences:
                t0 = time.perf_counter()
                pipe(sentence, truncation=True)
                times.append(time.perf_counter() - t0)
        if best is None or statistics.median(times) < best[0]:
            best = statistics.median(times), threads
    return best[1]


def pipeline_calls(pipe, sentences: list[str]) -> dict:
    """The in-process pipeline, one call per sentence; its answers are the reference."""
    answers, latencies = [], []
    meter = CpuMeter({"client": os.getpid()})
    meter.start()
    for sentence in sentences:
        t0 = time.perf_counter()
        best = pipe(sentence, truncation=True)[0]
        latencies.append(time.perf_counter() - t0)
        answers.append((best["label"], best["score"]))
    elapsed, cpu = meter.stop()
    return {"rate": len(sentences) / elapsed, "p50_ms": 1000 * statistics.median(latencies), "cpu": cpu,
            "answers": answers}


async def through_services(address: str, sentences: list[str], concurrency: int, meter: CpuMeter) -> dict:
    latencies: list[float] = []
    answers: list = [None] * len(sentences)
    next_index = 0
    async with AsyncPreprocClient(address, timeout=120) as client:
        for sentence in sentences[:16]:  # warm the connections and the batcher
            await client.classify([sentence])

        async def caller():
            nonlocal next_index
            while next_index < len(sentences):
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                reply = await client.classify([sentences[i]])
                latencies.append(time.perf_counter() - t0)
                answers[i] = (reply[0][0].label, reply[0][0].score)

        meter.start()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed, cpu = meter.stop()
    return {"rate": len(sentences) / elapsed, "p50_ms": 1000 * statistics.median(latencies), "cpu": cpu,
            "answers": answers}


def paired_single_calls(pipe, address: str, sentences: list[str]) -> dict:
    """Single-call latency, in process and through the services, measured in alternation.

    Sentence by sentence, one call each way in rotating order, so drift in the machine's speed
    hits both sides alike: the median of the paired differences is the services' added latency.
    A health Check on preproc_service rotates with them: one gRPC round trip to a service idle
    for as long as a forward pass, with no work behind it (the path makes two such round trips).
    """
    extra, round_trips = [], []
    with PreprocClient(address, timeout=60) as client, grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        calls = {"pipe": lambda s: pipe(s, truncation=True), "service": lambda s: client.classify([s]),
                 "round trip": lambda s: health.Check(health_pb2.HealthCheckRequest(), timeout=60)}
        for sentence in sentences[:8]:  # warm up all three
            for call in calls.values():
                call(sentence)
        order = list(calls)
        for i, sentence in enumerate(sentences):
            timed = {}
            for side in order[i % 3:] + order[:i % 3]:
                t0 = time.perf_counter()
                calls[side](sentence)
                timed[side] = 1000 * (time.perf_counter() - t0)
            extra.append(timed["service"] - timed["pipe"])
            round_trips.append(timed["round trip"])
    return {"extra_ms": statistics.median(extra), "round_trip_ms": statistics.median(round_trips),
            "n": len(sentences)}


def compare(answers: list, reference: list) -> tuple[int, float]:
    """(answers differing from the pipeline's: another label or a score off by more than the tolerance,
    largest score difference)."""
    wrong, worst = 0, 0.0
    for (label, score), (want_label, want_score) in zip(answers, reference, strict=True):
        worst = max(worst, abs(score - want_score))
        wrong += label != want_label or abs(score - want_score) > SCORE_TOLERANCE
    return wrong, worst


def parse_env(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def per_thousand(seconds: float, requests: int) -> str:
    return f"{1000 * seconds / requests:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(SHARED_SENTENCES))
    parser.add_argument("--limit", type=int, default=1000, help="first N sentences")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--paired", type=int, default=200, help="sentences for the paired concurrency-1 latency "
                        "(0: skip)")
    parser.add_argument("--batch-size", type=int, default=32, help="the in-process limit's sorted batches")
    parser.add_argument("--model-args", default="", help="extra model-service flags, space-separated")
    parser.add_argument("--model-env", default="", help="model-service environment, K=V,K=V (OMP_WAIT_POLICY=...)")
    parser.add_argument("--preproc-args", default="", help="extra preproc-service flags, space-separated")
    args = parser.parse_args(argv)

    import torch
    from transformers import pipeline

    if not Path(args.sentences).exists():  # read_sentences would fall back to the short test corpus
        parser.error(f"{args.sentences} not found: pass the benchmark sentences' path")
    sentences = read_sentences(Path(args.sentences), args.limit)
    levels = [int(x) for x in args.concurrency.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        directory, model, tokenizer = build_model(Path(tmp))
        lengths = [len(ids) for ids in tokenizer(sentences, truncation=True)["input_ids"]]
        print(f"{len(sentences)} sentences, {min(lengths)}-{max(lengths)} tokens "
              f"(mean {statistics.fmean(lengths):.0f}); MiniLM-L6 body + 3-label head (MLflow layout); "
              f"{os.cpu_count()} CPUs, in-process torch threads "
              f"{torch.get_num_threads()}; model-service {args.model_args or 'defaults'} {args.model_env}".rstrip())
        pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
        pipe(sentences[:4])  # warm up
        piped_threads = pipeline_threads(pipe, sentences[:16])
        in_process_limit(model, tokenizer, sentences[:64], args.batch_size)
        limits = [in_process_limit(model, tokenizer, sentences, args.batch_size)]
        with torch_threads(piped_threads):
            piped = pipeline_calls(pipe, sentences)
        results = {}
        model_args = ["--model-dir", str(directory), "--metrics-port", "0", *args.model_args.split()]
        with servers.service("model_service", model_args, env=parse_env(args.model_env)) as model_proc, \
                servers.preproc_service(directory, model_proc.address, "--metrics-port", "0",
                                        *args.preproc_args.split()) as preproc:
            meter = CpuMeter({"model": model_proc.proc.pid, "preproc": preproc.proc.pid, "client": os.getpid()})
            for c in levels:
                results[c] = asyncio.run(through_services(preproc.address, sentences, c, meter))
            with torch_threads(piped_threads):
                paired = paired_single_calls(pipe, preproc.address, sentences[:args.paired]) if args.paired else None
        limits.append(in_process_limit(model, tokenizer, sentences, args.batch_size))
        engine = engine_forward(model)
        engined = in_process_limit(model, tokenizer, sentences, args.batch_size, engine)

    limit = statistics.fmean(r["rate"] for r in limits)
    n = len(sentences)
    print(f"in-process limit before/after the services: {limits[0]['rate']:.1f} / {limits[1]['rate']:.1f} "
          f"sentences/s with {limits[0]['threads']} / {limits[1]['threads']} torch thread(s), the faster of "
          f"torch's default and 1 (the mean is the limit)")
    print()
    print("| system | sentences/s | ratio to limit | p50 ms | model_service CPU-s / 1k | preproc CPU-s / 1k "
          "| client (this process) CPU-s / 1k | answers equal to the pipeline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| in-process limit (tokenize + eager forward, sorted batches of {args.batch_size}) | {limit:.1f} | 1.00 "
          f"| - | - | - | {per_thousand(statistics.fmean(r['cpu']['client'] for r in limits), n)} | - |")
    print(f"| in-process, model_service's engine (its kernels), sorted batches of {args.batch_size} "
          f"| {engined['rate']:.1f} | {engined['rate'] / limit:.2f} | - | - | - "
          f"| {per_thousand(engined['cpu']['client'], n)} | - |")
    print(f"| in-process pipeline, one call per sentence ({piped_threads} torch thread(s), the faster of torch's "
          f"default and 1) | {piped['rate']:.1f} | {piped['rate'] / limit:.2f} "
          f"| {piped['p50_ms']:.1f} | - | - | {per_thousand(piped['cpu']['client'], n)} | reference |")
    mismatches = {}
    for c, r in results.items():
        wrong, worst = compare(r["answers"], piped["answers"])
        mismatches[c] = wrong
        print(f"| stack, concurrency {c} | {r['rate']:.1f} | {r['rate'] / limit:.2f} | {r['p50_ms']:.1f} "
              f"| {per_thousand(r['cpu']['model'], n)} | {per_thousand(r['cpu']['preproc'], n)} "
              f"| {per_thousand(r['cpu']['client'], n)} | {n - wrong}/{n} (max score diff {worst:.1e}) |")
    print()
    for c, target in ((32, 0.85), (8, 0.7)):
        if c in results:
            ratio = results[c]["rate"] / limit
            print(f"target concurrency {c}: >= {target:.2f} of the limit -> {ratio:.2f} "
                  f"({'met' if ratio >= target else 'NOT met'}); "
                  f"{results[c]['rate'] / engined['rate']:.2f} of the service's engine in process")
    if paired:
        budget = 2 * paired["round_trip_ms"] + 1
        print(f"target concurrency 1 ({paired['n']} paired calls): median added latency over the in-process "
              f"pipeline call {paired['extra_ms']:+.2f} ms <= 2 x bare gRPC round trip ({paired['round_trip_ms']:.2f}"
              f" ms) + 1 ms = {budget:.2f} ms -> {'met' if paired['extra_ms'] <= budget else 'NOT met'}")
    print(f"answers: {'all equal' if not any(mismatches.values()) else 'DIFFERENT'} "
          f"(label and score within {SCORE_TOLERANCE:g} of the pipeline's); run took "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
