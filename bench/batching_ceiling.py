"""How close can an online batcher get to length-sorted offline batches? A cost-model estimate.

    python bench/batching_ceiling.py [SENTENCES] [--model-dir DIR]

A forward pass of B rows padded to length L costs about `fixed + per_token x B x L`; both are
measured here on the model (least squares over a few shapes). The offline reference sees the
whole stream, sorts it by length and runs batches of 32. An online server at concurrency N
sees at most N rows at a time: for pools of N consecutive sentences this cuts each pool with
the service's own `plan_groups` and prints the modelled throughput relative to the offline
batches. It shows the ceiling of any padded batching at that concurrency, before any gRPC
or scheduling cost.

Then the same for one large request (an Embed of every sentence, as preproc sends it: slices of
--batch-size rows at once), played out with model_service's own `Batcher._take_batch` at several
--max-pass-ms: how close the passes it cuts come to sorted batches.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_model_infer import read_sentences, tokenize  # noqa: E402
from model_service.batcher import plan_groups  # noqa: E402
from tests import model_factory  # noqa: E402
from tests.ops_helpers import SHARED_SENTENCES  # noqa: E402

SHAPES = [(1, 8), (1, 64), (4, 32), (8, 32), (16, 64), (32, 32)]


def measure_cost(model_dir: Path) -> tuple[float, float]:
    """(fixed ms per forward, ms per padded token), fitted to timed forwards of SHAPES."""
    import torch

    from model_service.engine import default_torch_threads
    from model_service.loader import LoadOptions, load

    torch.set_num_threads(default_torch_threads())
    model = load(LoadOptions(str(model_dir), device="cpu")).model
    tokens, millis = [], []
    with torch.inference_mode():
        for rows, length in SHAPES:
            ids = torch.randint(1000, 20000, (rows, length))
            model(input_ids=ids)
            start, repeats = time.perf_counter(), max(3, 128 // rows)
            for _ in range(repeats):
                model(input_ids=ids)
            tokens.append(rows * length)
            millis.append(1000 * (time.perf_counter() - start) / repeats)
    per_token, fixed = np.polyfit(tokens, millis, 1)
    return float(fixed), float(per_token)


def cost(groups_lengths: list[list[int]], fixed: float, per_token: float) -> float:
    return sum(fixed + per_token * len(g) * max(g) for g in groups_lengths)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(SHARED_SENTENCES))
    parser.add_argument("--model-dir", default="", help="default: the real all-MiniLM-L6-v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cost", default="", metavar="FIXED_MS,PER_TOKEN_US",
                        help="use this forward cost instead of measuring it (a busy machine's timings mean "
                             "little), e.g. 5.21,148 as measured on the idle 2-core machine (bench/NOTES.md)")
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir) if args.model_dir else model_factory.minilm_dir()
    lengths = [len(r) for r in tokenize(model_dir, read_sentences(Path(args.sentences), 0), 256)]
    if args.cost:
        fixed, per_token_us = (float(x) for x in args.cost.split(","))
        per_token = per_token_us / 1000
    else:
        fixed, per_token = measure_cost(model_dir)
    overhead_tokens = round(fixed / per_token)
    print(f"{len(lengths)} sentences; measured forward cost: {fixed:.2f} ms per pass + {per_token * 1000:.0f} µs "
          f"per padded token (fixed cost = {overhead_tokens} token-equivalents)")

    ordered = sorted(lengths)
    size = args.batch_size
    offline = cost([ordered[i:i + size] for i in range(0, len(ordered), size)], fixed, per_token)
    in_order = cost([lengths[i:i + size] for i in range(0, len(lengths), size)], fixed, per_token)
    print()
    print("| rows visible at once | modelled throughput vs sorted offline batches | vs in-order batches |")
    print("| ---: | ---: | ---: |")
    for pool in (1, 8, 16, 32):
        online = 0.0
        for start in range(0, len(lengths), pool):
            window = sorted(lengths[start:start + pool])
            cuts = plan_groups(window, size, 1 << 30, overhead_tokens)
            online += cost([window[a:b] for a, b in cuts], fixed, per_token)
        print(f"| {pool} | {offline / online:.2f} | {in_order / online:.2f} |")

    print()
    print(f"One request of all {len(lengths)} sentences (an Embed of that many texts: preproc sends slices of "
          f"{size} rows at once), cut into passes by model_service's own Batcher:")
    print("| --max-pass-ms | passes | mean rows per pass | modelled throughput vs sorted offline batches |")
    print("| ---: | ---: | ---: | ---: |")
    for max_pass_ms in (0.0, 50.0, 100.0):
        passes = asyncio.run(service_passes(lengths, size, overhead_tokens, per_token / 1000, max_pass_ms))
        online = cost(passes, fixed, per_token)
        print(f"| {max_pass_ms:g}{' (token budget only)' if not max_pass_ms else ''} | {len(passes)} | "
              f"{len(lengths) / len(passes):.1f} | {offline / online:.2f} |")


async def service_passes(lengths: list[int], slice_rows: int, overhead_tokens: int, seconds_per_token: float,
                         max_pass_ms: float) -> list[list[int]]:
    """The row lengths of each forward pass `Batcher._take_batch` cuts, one after another, for one request
    of `lengths` sent as slices of `slice_rows` (no other traffic; the cost per token as measured)."""
    from types import SimpleNamespace

    from model_service.batcher import Batcher, _Pending
    from model_service.requests import InferJob

    engine = SimpleNamespace(forward_workers=2, torch_threads=1)  # only the policy runs here: nothing is computed
    batcher = Batcher(engine, None, max_batch_size=slice_rows, overhead_tokens=overhead_tokens,
                      max_pass_ms=max_pass_ms)
    batcher.cost.seconds_per_token = seconds_per_token
    loop = asyncio.get_running_loop()
    for order, start in enumerate(range(0, len(lengths), slice_rows)):
        rows = [np.zeros(n, dtype=np.int64) for n in lengths[start:start + slice_rows]]
        job = InferJob(request_id=str(order), rows=rows, type_rows=None, padded_length=max(map(len, rows)),
                       outputs=[])
        batcher._waiting[order] = _Pending(job, loop.create_future(), None, False, order, 0.0)
        batcher._queued_rows += job.batch
    passes = []
    while (batch := batcher._take_batch()) is not None:
        passes.append([row.length for row in batch.rows])
    return passes


if __name__ == "__main__":
    main()
