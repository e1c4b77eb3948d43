"""The batcher under a blocked engine (in-process server on loopback): full queue, stale requests
dropped before compute, and the length grouping plan."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest

from client.tensor_client import AsyncTensorClient
from model_service import cli, server
from model_service.batcher import plan_groups
from tests import model_factory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = model_factory.build_encoder("text-classification", seed=2)
    return model_factory.save_components(tmp_path_factory.mktemp("batching") / "tc", model, tokenizer,
                                         "text-classification")


def row(n: int) -> dict:
    return {"input_ids": np.arange(2, 2 + n, dtype=np.int64)[None, :]}


async def with_server(model_dir, *flags, scenario):
    args = cli.parse_args(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "0", "--http-port", "0", *flags])
    running = await server.start(args)
    try:
        async with AsyncTensorClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            return await scenario(running.runtime, client)
    finally:
        await server.shutdown(running)


def block_engine(runtime):
    """Occupy the engine's worker thread until the returned event is set."""
    gate = threading.Event()
    started = threading.Event()

    def hold():
        started.set()
        gate.wait(60)

    task = asyncio.ensure_future(runtime.engine.run(hold))
    return gate, started, task


def test_full_queue_is_resource_exhausted_then_serving_resumes(model_dir):
    async def scenario(runtime, client):
        gate, started, blocker = block_engine(runtime)
        await asyncio.to_thread(started.wait, 10)
        # While blocked at most 2 batches x 4 rows are in flight and 4 rows may wait: 20 calls overflow.
        calls = [asyncio.ensure_future(client.infer(row(3 + i % 5), outputs=["logits"])) for i in range(20)]
        while runtime.batcher.stats.rejected_full == 0:
            await asyncio.sleep(0.01)
        gate.set()
        await blocker
        results = await asyncio.gather(*calls, return_exceptions=True)
        after = await client.infer(row(4), outputs=["logits"])
        return results, after

    results, after = asyncio.run(with_server(model_dir, "--max-batch-size", "4", "--max-queue-rows", "4",
                                             "--max-wait-us", "0", scenario=scenario))
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and len(refused) + len(served) == 20
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in r.details() for r in refused)
    assert after["logits"].shape == (1, 3)


def test_caller_gone_before_compute_is_dropped(model_dir):
    async def scenario(runtime, client):
        stats = runtime.batcher.stats
        gate, started, blocker = block_engine(runtime)
        await asyncio.to_thread(started.wait, 10)
        rows_before = stats.rows
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer(row(5), outputs=["logits"], timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        await blocker
        good = await client.infer(row(6), outputs=["logits"])
        return stats, rows_before, good

    stats, rows_before, good = asyncio.run(with_server(model_dir, scenario=scenario))
    assert stats.dropped_cancelled + stats.dropped_deadline == 1
    assert stats.rows == rows_before + 1  # only the good request's row was computed
    assert good["logits"].shape == (1, 3)


def test_plan_groups_limits_padding():
    lengths = sorted([10, 11, 12, 13, 60, 62, 64, 120])
    groups = plan_groups(lengths, max_rows=32, token_budget=100_000, overhead_tokens=16)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(groups[:-1], groups[1:], strict=True))
    padded = sum((end - start) * lengths[end - 1] for start, end in groups)
    assert padded < len(lengths) * max(lengths) / 2
    # No overhead difference worth splitting for: equal lengths stay in one batch; limits are kept.
    assert plan_groups([7] * 10, 32, 100_000, 16) == [(0, 10)]
    assert all(end - start <= 4 for start, end in plan_groups([7] * 10, 4, 100_000, 16))
    assert all((end - start) * 50 <= 120 for start, end in plan_groups([50] * 6, 32, 120, 0))
