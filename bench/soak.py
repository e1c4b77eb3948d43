"""Soak: the pair at saturation for a long while; nothing lost, memory flat (issue 12, "Show").

    python bench/soak.py [SENTENCES] [--minutes 10] [--concurrency 32]

The real all-MiniLM-L6-v2 (feature-extraction) behind preproc_service and model_service on
loopback; `--concurrency` callers each send Embed of 1-8 sentences, one call after another,
for `--minutes`. Every call's status is counted: "lost" is every call that did not end OK
(the target is 0). The resident memory (RSS) of both services is sampled every 2 s. model_service's
RSS swings by tens of MiB between samples (the allocator's free memory goes back to the system at
most once a second, so a sample may fall before or after a release), so growth is measured on the
median of the minute from `--baseline-minute` (default 2, or a fifth of a shorter run) against the
median of the last minute, and the same for the maxima; both must stay under 5 %. The figure of
one sample at the baseline against the last sample (what earlier runs reported) is printed too.
Exits 1 when a target is missed.

Too long for a machine shared with other work: run it on its own (a `--minutes 1` run checks
the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402

from client.preproc_client import AsyncPreprocClient  # noqa: E402
from tests import model_factory, servers  # noqa: E402
from tests.adapter_helpers import rss_mib  # noqa: E402
from tests.ops_helpers import SHARED_SENTENCES, read_sentences  # noqa: E402

SAMPLE_SECONDS = 2.0
GROWTH_TARGET = 5.0  # %
DEADLINE = 60.0




async def caller(address: str, sentences: list[str], worker: int, until: float, codes: collections.Counter,
                 messages: dict) -> None:
    async with AsyncPreprocClient(address, timeout=DEADLINE) as client:
        i = worker
        while time.monotonic() < until:
            texts = [sentences[(i + k) % len(sentences)] for k in range(1 + i % 8)]
            try:
                result = await client.embed(texts)
                codes["OK" if len(result) == len(texts) else "WRONG"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                messages.setdefault(exc.code().name, exc.details() or "")
            i += 1


async def sample_rss(pids: dict, until: float, samples: list) -> None:
    started = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - started, {name: rss_mib(pid) for name, pid in pids.items()}))
        await asyncio.sleep(SAMPLE_SECONDS)
    samples.append((time.monotonic() - started, {name: rss_mib(pid) for name, pid in pids.items()}))


def window(samples: list, name: str, start: float, end: float) -> list[float]:
    """One service's RSS samples taken from `start` s to before `end` s."""
    return [rss[name] for t, rss in samples if start <= t < end]


def growth(before: float, after: float) -> float:
    return 100 * (after - before) / before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(SHARED_SENTENCES))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--baseline-minute", type=float, default=2.0,
                        help="RSS growth is measured from here to the end (at most a fifth of the run)")
    args = parser.parse_args()

    sentences = read_sentences(Path(args.sentences))
    model_dir = model_factory.minilm_dir()
    quiet = ["--metrics-port", "0", "--log-level", "WARNING"]
    seconds = 60 * args.minutes
    baseline = min(60 * args.baseline_minute, seconds / 5)
    print(f"all-MiniLM-L6-v2 feature-extraction; {args.concurrency} callers x Embed of 1-8 sentences for "
          f"{args.minutes:g} min; RSS growth from {baseline:.0f} s to the end")
    codes: collections.Counter = collections.Counter()
    messages: dict[str, str] = {}  # the first message per status
    samples: list = []
    with servers.model_service(model_dir, *quiet) as model, \
            servers.preproc_service(model_dir, model.address, *quiet) as preproc:
        pids = {"model_service": model.proc.pid, "preproc_service": preproc.proc.pid}

        async def run() -> float:
            started = time.monotonic()
            until = started + seconds
            await asyncio.gather(sample_rss(pids, until, samples),
                                 *(caller(preproc.address, sentences, w, until, codes, messages)
                                   for w in range(args.concurrency)))
            return time.monotonic() - started

        elapsed = asyncio.run(run())
        alive = {name: proc.poll() is None for name, proc in (("model_service", model.proc),
                                                              ("preproc_service", preproc.proc))}

    total = sum(codes.values())
    lost = total - codes["OK"]
    print(f"\ncalls: {total} in {elapsed:.0f} s ({total / elapsed:.1f}/s); by status {dict(codes)}; lost {lost}")
    for code, message in messages.items():
        print(f"first {code}: {message}")
    # As reported before: one sample at the baseline and each minute, against the last sample.
    start_rss = next(rss for t, rss in samples if t >= baseline)
    end_rss = samples[-1][1]
    minutes = [next((rss for t, rss in samples if t >= 60 * m), end_rss) for m in range(1, int(elapsed // 60) + 1)]
    for name in pids:
        print(f"{name} RSS MiB at each minute (one sample): " + " ".join(f"{rss[name]:.0f}" for rss in minutes))
    # Robust: the median and the maximum of each minute's samples, the baseline's minute against the last.
    end = samples[-1][0]
    spans = [(60 * m, 60 * (m + 1)) for m in range(int(end // 60))] or [(0, end)]
    for name in pids:
        per_minute = [w for w in (window(samples, name, *span) for span in spans) if w]
        print(f"{name} RSS per minute, median (max) MiB: "
              + " ".join(f"{statistics.median(w):.0f} ({max(w):.0f})" for w in per_minute))
    print(f"\n| service | start MiB | one sample: at {baseline:.0f} s -> end | median of minute "
          f"{baseline:.0f}-{baseline + 60:.0f} s -> last minute | max of the same |")
    print("| --- | --- | --- | --- | --- |")
    missed = {}
    for name in pids:
        first = window(samples, name, baseline, baseline + 60)
        last = window(samples, name, end - 60, end + 1)
        figures = {"one sample": growth(start_rss[name], end_rss[name]),
                   "median": growth(statistics.median(first), statistics.median(last)),
                   "max": growth(max(first), max(last))}
        print(f"| {name} | {samples[0][1][name]:.0f} | {start_rss[name]:.0f} -> {end_rss[name]:.0f} = "
              f"{figures['one sample']:+.1f} % | {statistics.median(first):.0f} -> {statistics.median(last):.0f} = "
              f"{figures['median']:+.1f} % | {max(first):.0f} -> {max(last):.0f} = {figures['max']:+.1f} % |")
        if figures["median"] >= GROWTH_TARGET or figures["max"] >= GROWTH_TARGET:
            missed[name] = figures
    ok = lost == 0 and not missed and all(alive.values())
    print("targets met" if ok else f"targets missed (lost {lost}, growth {missed}, alive {alive})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
