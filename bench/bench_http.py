"""The same requests over HTTP and over gRPC, to one preproc_service + model_service pair.

    python bench/bench_http.py [--requests 400] [--rounds 2]

Model: the real all-MiniLM-L6-v2 (sentence-transformers directory, mean pooling), one sentence
per request. Two request kinds:
- embeddings: OpenAI's POST /v1/embeddings vs the gRPC Embeddings RPC (what it calls);
- embed-json: POST /splitserve.v1.Preproc/Embed (protobuf JSON) vs the gRPC Embed RPC.
At concurrency 1 and 32 (asyncio callers, keep-alive connections: aiohttp for HTTP, one grpc.aio
channel for gRPC), HTTP and gRPC runs alternate, `--rounds` times, and the figures are the
medians over rounds. Targets: HTTP >= 0.9 of gRPC's throughput at 32, p50 within 1 ms at 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import aiohttp  # noqa: E402
import grpc  # noqa: E402

from splitserve_pb import preproc_pb2 as pb  # noqa: E402
from splitserve_pb import preproc_pb2_grpc  # noqa: E402
from tests import model_factory, servers  # noqa: E402
from tests.preproc_helpers import SENTENCES  # noqa: E402


async def run(call, texts: list[str], concurrency: int) -> tuple[float, float]:
    """(requests/s, p50 ms) of `call(text)` over texts by `concurrency` callers."""
    queue = list(enumerate(texts))
    latencies: list[float] = []

    async def worker():
        while queue:
            _, text = queue.pop()
            start = time.perf_counter()
            await call(text)
            latencies.append((time.perf_counter() - start) * 1e3)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return len(texts) / elapsed, statistics.median(latencies)


async def bench(http_url: str, grpc_address: str, requests: int, rounds: int) -> list[tuple]:
    texts = [SENTENCES[i % len(SENTENCES)] + f" {i}" for i in range(requests)]
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = preproc_pb2_grpc.PreprocStub(channel)
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(path: str, body: dict):
            async with session.post(http_url + path, data=json.dumps(body),
                                    headers={"content-type": "application/json"}) as reply:
                payload = await reply.read()
                assert reply.status == 200, payload
                return payload

        kinds = {
            "embeddings": (lambda t: post("/v1/embeddings", {"input": [t]}),
                           lambda t: stub.Embeddings(pb.EmbeddingsRequest(input=[t]))),
            "embed-json": (lambda t: post("/splitserve.v1.Preproc/Embed", {"texts": [t], "pooling": "mean"}),
                           lambda t: stub.Embed(pb.EmbedRequest(texts=[t], pooling="mean"))),
        }
        for http_call, grpc_call in kinds.values():  # warm both paths
            await run(http_call, texts[:32], 8)
            await run(grpc_call, texts[:32], 8)
        rows = []
        for kind, (http_call, grpc_call) in kinds.items():
            for concurrency in (1, 32):
                count = requests // 4 if concurrency == 1 else requests
                results = {"http": [], "grpc": []}
                for r in range(rounds):
                    order = [("http", http_call), ("grpc", grpc_call)]
                    for name, call in (order if r % 2 == 0 else order[::-1]):
                        results[name].append(await run(call, texts[:count], concurrency))
                http_rps = statistics.median(x[0] for x in results["http"])
                grpc_rps = statistics.median(x[0] for x in results["grpc"])
                http_p50 = statistics.median(x[1] for x in results["http"])
                grpc_p50 = statistics.median(x[1] for x in results["grpc"])
                rows.append((kind, concurrency, grpc_rps, http_rps, http_rps / grpc_rps, grpc_p50, http_p50,
                             http_p50 - grpc_p50))
    await channel.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = model_factory.minilm_dir()
    quiet = ("--metrics-port", "0")
    with servers.model_service(model_dir, *quiet) as ms, servers.preproc_service(model_dir, ms.address, *quiet) as pp:
        rows = asyncio.run(bench(pp.http_url, pp.address, args.requests, args.rounds))
    print(f"\nHTTP vs gRPC, all-MiniLM-L6-v2, one sentence per request, medians of {args.rounds} alternating rounds")
    print("| request | concurrency | gRPC req/s | HTTP req/s | HTTP/gRPC | gRPC p50 ms | HTTP p50 ms | p50 diff ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, c, grpc_rps, http_rps, ratio, grpc_p50, http_p50, diff in rows:
        print(f"| {kind} | {c} | {grpc_rps:.1f} | {http_rps:.1f} | {ratio:.2f} | {grpc_p50:.2f} | {http_p50:.2f} | "
              f"{diff:+.2f} |")


if __name__ == "__main__":
    main()
