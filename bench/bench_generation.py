"""Generation throughput over the pair against sequential in-process `model.generate`.

Starts model_service and preproc_service (subprocesses, loopback) on a tiny GPT-2 built by
tests/model_factory.py, streams GenerateTextStream with 1, 8 and 32 concurrent streams, and
prints generated tokens/s, its ratio to sequential in-process greedy `generate` on the same
model measured in the same run, and time to first token (p50, p95). Every request generates
exactly --max-new-tokens tokens (min_new_tokens = max_new_tokens), greedy.

    python bench/bench_generation.py [--sentences ../shared/bench/sentences.txt] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.generation_client import AsyncGenerationClient  # noqa: E402
from tests import model_factory, servers  # noqa: E402

DEFAULT_SENTENCES = ROOT.parent / "shared" / "bench" / "sentences.txt"


def load_prompts(path: Path, count: int, words: int) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [" ".join(lines[i % len(lines)].split()[:words]) for i in range(count)]


def sequential_reference(model, tokenizer, prompts, max_new_tokens: int) -> float:
    """Generated tokens/s of in-process greedy generate, one prompt after another."""
    import torch

    model.generate(torch.tensor([tokenizer(prompts[0])["input_ids"]]), max_new_tokens=2, do_sample=False)  # warm-up
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


async def through_the_pair(address: str, prompts, concurrency: int, max_new_tokens: int):
    """(generated tokens/s, time-to-first-token list) with `concurrency` streams in flight."""
    slots = asyncio.Semaphore(concurrency)
    ttfts, counts = [], []

    async with AsyncGenerationClient(address, timeout=600) as client:
        async def one(prompt):
            async with slots:
                start = time.perf_counter()
                first = None
                stream = client.generate_stream(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                                return_full_text=False)
                async for _ in stream:
                    if first is None:
                        first = time.perf_counter() - start
                ttfts.append(first)
                counts.append(stream.result.completion_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, ttfts


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=Path, default=DEFAULT_SENTENCES, help="one request per line")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--sequential-requests", type=int, default=16, help="requests for the in-process reference")
    parser.add_argument("--prompt-words", type=int, default=8, help="words of each sentence used as the prompt")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch CPU threads, the same for the reference and model_service")
    parser.add_argument("--stream-interval", type=int, default=0,
                        help="model_service --gen-stream-interval: tokens per streamed message (0: adaptive)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    import torch

    torch.set_num_threads(args.torch_threads)
    model, tokenizer = model_factory.build_gpt2()
    prompts = load_prompts(args.sentences, max(args.requests, args.sequential_requests), args.prompt_words)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = model_factory.save_components(Path(tmp) / "gpt2", model, tokenizer, "text-generation",
                                             instance_type="TextGenerationPipeline")
        quiet = ("--metrics-port", "0", "--log-level", "WARNING")
        threads = ("--torch-threads", str(args.torch_threads), "--gen-stream-interval", str(args.stream_interval))
        with servers.model_service(root, *quiet, *threads) as ms, \
                servers.preproc_service(root, ms.address, *quiet) as pp:
            asyncio.run(through_the_pair(pp.address, prompts[:4], 4, 4))  # warm-up
            for level in levels:
                # The reference runs right before each level (the servers idle meanwhile), so both see
                # the same machine load.
                reference = sequential_reference(model, tokenizer, prompts[:args.sequential_requests],
                                                 args.max_new_tokens)
                rate, ttfts = asyncio.run(through_the_pair(pp.address, prompts[:args.requests], level,
                                                           args.max_new_tokens))
                rows.append((level, rate, reference, ttfts))

    print(f"\ngeneration: tiny GPT-2 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), "
          f"{args.max_new_tokens} new tokens per request, greedy, {args.torch_threads} torch thread(s), "
          f"stream interval {args.stream_interval}, prompts from {args.sentences}")
    print(f"sequential = in-process model.generate, one request after another ({args.sequential_requests} "
          "requests, measured just before each row)\n")
    print("| streams | requests | tokens/s | sequential tokens/s | x sequential | TTFT p50 ms | TTFT p95 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for level, rate, reference, ttfts in rows:
        print(f"| {level} | {args.requests} | {rate:.1f} | {reference:.1f} | {rate / reference:.2f} | "
              f"{statistics.median(ttfts) * 1e3:.1f} | {percentile(ttfts, 0.95) * 1e3:.1f} |")

if __name__ == "__main__":
    main()
