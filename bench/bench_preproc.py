"""text-classification through client -> preproc_service -> model_service vs in process, same run.

    python bench/bench_preproc.py [SENTENCES] [--concurrency 1,8,32] [--limit 512]

SENTENCES defaults to ../shared/bench/sentences.txt (relative to the repo root). The model is the
real all-MiniLM-L6-v2 body with a seeded 3-label classification head, saved in the MLflow
components layout (a realistic encoder size; the tiny test models cost less than the wire).

References, measured in this process before and after the services run (the mean is used):
- pipeline batch 32: `pipeline(sentences, batch_size=32)` (sentences/s);
- forward limit: tokenized once, length-sorted batches of 32, forward only (sentences/s): the
  most any server could do with this model on this machine.
The services answer one sentence per request from N concurrent asyncio callers. The c=1 latency
target is checked on paired calls: sentence by sentence, one pipeline call in this process and
one call through the services, in rotating order with a bare gRPC round trip (a health Check) that
shows what the transport alone costs on the machine (`paired_single_calls`).
"""

from __future__ import annotations

import argparse
import asyncio
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

from client.preproc_client import AsyncPreprocClient, PreprocClient  # noqa: E402
from tests import model_factory, servers  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


def read_sentences(path: Path, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def build_model(root: Path):
    """MiniLM body + seeded classification head, saved as MLflow components; (dir, model, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = model_factory.minilm_dir()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    directory = model_factory.save_components(root / "minilm-classifier", model, tokenizer, "text-classification")
    return directory, model, tokenizer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_pipeline(model, tokenizer, threads: int):
    import torch
    from transformers import pipeline

    torch.set_num_threads(threads)
    return pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")


def in_process(model, tokenizer, sentences: list[str], batch_size: int, threads: int) -> dict:
    """Throughput references: the pipeline with batch_size, and the forward limit.
    (Single-call latency is measured paired with the services: paired_single_calls.)"""
    import torch

    pipe = make_pipeline(model, tokenizer, threads)
    pipe(sentences[:4])  # warm up
    t0 = time.perf_counter()
    pipe(sentences, batch_size=batch_size, truncation=True)
    pipeline_rate = len(sentences) / (time.perf_counter() - t0)

    enc = tokenizer(sentences, truncation=True)
    rows = sorted(enc["input_ids"], key=len)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            length = max(len(r) for r in chunk)
            ids = torch.zeros((len(chunk), length), dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            model(input_ids=ids, attention_mask=mask).logits.numpy()
    forward_rate = len(rows) / (time.perf_counter() - t0)
    return {"pipeline_rate": pipeline_rate, "forward_rate": forward_rate}


def paired_single_calls(pipe, address: str, sentences: list[str]) -> dict:
    """Single-call latency, in process and through the services, measured in alternation.

    Sentence by sentence, one call each way in rotating order, so drift in the machine's speed
    hits both sides alike: the median of the paired differences is the services' added latency.
    A health Check on preproc_service rotates with them: one gRPC round trip to a service idle
    for as long as a forward pass, with no work behind it (the path makes two such round trips).
    """
    inside, through, extra, round_trips = [], [], [], []
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
            inside.append(timed["pipe"])
            through.append(timed["service"])
            extra.append(timed["service"] - timed["pipe"])
            round_trips.append(timed["round trip"])
    return {"pipe_p50": statistics.median(inside), "service_p50": statistics.median(through),
            "extra_p50": statistics.median(extra), "round_trip_p50": statistics.median(round_trips),
            "n": len(sentences)}


async def through_services(address: str, sentences: list[str], concurrency: int) -> dict:
    latencies: list[float] = []
    next_index = 0
    async with AsyncPreprocClient(address, timeout=120) as client:
        for sentence in sentences[:16]:  # warm the connections and the batcher
            await client.classify([sentence])

        async def caller():
            nonlocal next_index
            while next_index < len(sentences):
                sentence = sentences[next_index]
                next_index += 1
                t0 = time.perf_counter()
                await client.classify([sentence])
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"rate": len(sentences) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * percentile(latencies, 0.99)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(ROOT.parent / "shared" / "bench" / "sentences.txt"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--limit", type=int, default=256, help="first N sentences (0: all)")
    parser.add_argument("--singles", type=int, default=256, help="sentences for concurrency 1 and the paired "
                        "single-call latencies")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads, in process and in model_service alike (the other cores are left to "
                             "the services' own work and the client)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-args", default="", help="extra model-service flags, space-separated")
    args = parser.parse_args(argv)

    sentences = read_sentences(Path(args.sentences), args.limit)
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        directory, model, tokenizer = build_model(Path(tmp))
        lengths = [len(ids) for ids in tokenizer(sentences, truncation=True)["input_ids"]]
        print(f"{len(sentences)} sentences, {min(lengths)}-{max(lengths)} tokens "
              f"(mean {statistics.fmean(lengths):.0f}); MiniLM-L6 body + 3-label head; {os.cpu_count()} CPUs, "
              f"{args.torch_threads} torch thread(s)")
        before = in_process(model, tokenizer, sentences, args.batch_size, args.torch_threads)
        results = {}
        model_flags = ["--max-batch-size", str(args.batch_size), "--torch-threads", str(args.torch_threads),
                       "--metrics-port", "0", *args.model_args.split()]
        with servers.model_service(directory, *model_flags) as model_proc, \
                servers.preproc_service(directory, model_proc.address, "--metrics-port", "0") as preproc:
            for c in levels:
                work = sentences[:args.singles] if c == 1 else sentences
                results[c] = asyncio.run(through_services(preproc.address, work, c))
            if 1 in levels:
                paired = paired_single_calls(make_pipeline(model, tokenizer, args.torch_threads), preproc.address,
                                             sentences[:args.singles])
        after = in_process(model, tokenizer, sentences, args.batch_size, args.torch_threads)

    ref = {key: (before[key] + after[key]) / 2 for key in before}
    print(f"in process: pipeline batch {args.batch_size} "
          f"{ref['pipeline_rate']:.1f} sentences/s; forward limit {ref['forward_rate']:.1f} sentences/s "
          f"(before/after: {before['forward_rate']:.1f}/{after['forward_rate']:.1f})")
    print()
    print("| concurrency | services sentences/s | p50 ms | p99 ms | vs forward limit | vs pipeline batch 32 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, r in results.items():
        print(f"| {c} | {r['rate']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['rate'] / ref['forward_rate']:.2f} | {r['rate'] / ref['pipeline_rate']:.2f} |")
    print()
    if max(levels) >= 32:
        ratio = results[max(levels)]["rate"] / ref["forward_rate"]
        print(f"target c={max(levels)}: >= 0.80 of the forward limit -> {ratio:.2f} "
              f"({'met' if ratio >= 0.8 else 'NOT met'})")
    if 1 in results:
        print(f"single calls in alternation ({paired['n']} sentences, one pipeline call and one call through "
              f"the services each): p50 in process {paired['pipe_p50']:.2f} ms, through the services "
              f"{paired['service_p50']:.2f} ms; median added latency {paired['extra_p50']:+.2f} ms")
        print(f"target c=1: p50 <= in-process single call + 2 ms -> {paired['extra_p50']:+.2f} ms "
              f"({'met' if paired['extra_p50'] <= 2.0 else 'NOT met'})")
        print(f"transport on this machine: one gRPC round trip to the idle preproc_service (health Check, "
              f"nothing behind it) p50 {paired['round_trip_p50']:.2f} ms; the path makes two "
              f"(client -> preproc -> model): ~{2 * paired['round_trip_p50']:.2f} ms of the above")


if __name__ == "__main__":
    main()
