"""One forward worker with every CPU against several narrower ones, through ModelInfer, in one run.

    python bench/bench_forward_workers.py [SENTENCES] [--concurrency 32] [--limit 400] [--rounds 2]

Each round starts model_service twice on the same model (the real all-MiniLM-L6-v2 by default):
`--forward-workers 1` (torch on every CPU) and `--forward-workers 0` (the default split: 2 workers
on a CPU node, each on its share of the CPUs), sends the same sentences, one per request, from N
concurrent callers, and measures the in-process length-sorted forward (the limit) beside them.
Prints sentences/s per configuration and round, the ratio split / one worker, and each against the
limit. Compare within a round: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_model_infer import in_process_rate, read_sentences, service_rate, tokenize  # noqa: E402

from tests import model_factory, servers  # noqa: E402

CONFIGS = {"1 worker x all CPUs": ["--forward-workers", "1"], "default split": ["--forward-workers", "0"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(ROOT.parent / "shared" / "bench" / "sentences.txt"))
    parser.add_argument("--model-dir", default="", help="default: the real all-MiniLM-L6-v2")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit", type=int, default=400, help="first N sentences (0: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir) if args.model_dir else model_factory.minilm_dir()
    rows = tokenize(model_dir, read_sentences(Path(args.sentences), args.limit), 256)
    print(f"{len(rows)} sentences, concurrency {args.concurrency}, {args.rounds} round(s)")
    print("| round | configuration | sent/s | p50 ms | mean batch | / sorted in-process | / 1 worker |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    ratios = []
    for round_no in range(1, args.rounds + 1):
        limit = in_process_rate(model_dir, rows, args.batch_size, True)[0]
        rates = {}
        for name, flags in CONFIGS.items():
            extra = ["--max-batch-size", str(args.batch_size), "--metrics-port", "0", *flags]
            with servers.model_service(model_dir, *extra) as service:
                rates[name] = asyncio.run(service_rate(service.address, service.proc.pid, rows, args.concurrency))
        limit = (limit + in_process_rate(model_dir, rows, args.batch_size, True)[0]) / 2
        one = rates["1 worker x all CPUs"]["rate"]
        for name, r in rates.items():
            print(f"| {round_no} | {name} | {r['rate']:.1f} | {r['p50_ms']:.0f} | {r['mean_batch']:.1f} "
                  f"| {r['rate'] / limit:.2f} | {r['rate'] / one:.2f} |")
        ratios.append(rates["default split"]["rate"] / one)
    print(f"default split / 1 worker: {', '.join(f'{x:.2f}' for x in ratios)} (median "
          f"{statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
