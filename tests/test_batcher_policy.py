"""The batcher's scheduling policy without a server: a real tiny model in a real Engine, requests
submitted straight to model_service.batcher.Batcher (issue 12 "fairness", issue 13 "batches nearer
to sorted"). A large request runs as passes of about --max-pass-ms; a small request that arrives
while passes of a large one are queued takes their place; answers are those of one whole pass."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from model_service import batcher as batcher_module
from model_service import loader, requests
from model_service.batcher import Batcher
from model_service.engine import Engine
from model_service.served_model import discover
from splitserve_common.errors import ConfigurationError
from splitserve_common.v2_codec import encode_request
from tests import model_factory
from tests.model_service_helpers import until


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model, tokenizer = model_factory.build_encoder("text-classification", seed=6)
    directory = model_factory.save_components(tmp_path_factory.mktemp("policy") / "tc", model, tokenizer,
                                              "text-classification")
    return loader.load(loader.LoadOptions(model_dir=str(directory), device="cpu"))


def job(info, lengths: list[int]):
    """One request of rows of `lengths` (distinct ids per row, right-padded with an attention mask)."""
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(5 + i, 5 + i + n) % 90 + 5
        mask[i, :n] = 1
    return requests.parse(encode_request({"input_ids": ids, "attention_mask": mask}, outputs=["logits"]), info)


async def serving(loaded, **batcher_args):
    engine = Engine(loaded, torch_threads=1, forward_workers=2)
    info = await engine.run(discover, engine, "tc", 32)  # requests of up to 32 rows; passes per batcher_args
    batcher = Batcher(engine, info, **batcher_args)
    batcher.start()
    return engine, info, batcher


async def closing(engine, batcher):
    await batcher.stop()
    engine.close()


def test_a_large_request_runs_as_passes_of_about_max_pass_ms_with_the_same_answers(loaded):
    """No forward pass of a few µs exists, so --max-pass-ms 0.01 leaves one row per pass; 0 leaves one
    pass for the whole request (--token-budget alone; a high per-pass overhead keeps its rows together)."""
    lengths = [9, 30, 4, 17, 30, 12, 25, 6]

    async def run(max_pass_ms):
        engine, info, batcher = await serving(loaded, max_wait_us=0, max_pass_ms=max_pass_ms, overhead_tokens=1000)
        try:
            await batcher.submit(job(info, [8]))  # the cost per token is measured on a first pass
            before = dict(batcher.stats.sizes)
            result = await batcher.submit(job(info, lengths))
            sizes = {k: v - before.get(k, 0) for k, v in batcher.stats.sizes.items() if v != before.get(k, 0)}
            return result.outputs["logits"], sizes, batcher.pass_tokens()
        finally:
            await closing(engine, batcher)

    split, split_sizes, split_tokens = asyncio.run(run(0.01))
    whole, whole_sizes, whole_tokens = asyncio.run(run(0))
    assert whole_sizes == {len(lengths): 1} and whole_tokens == 16384
    assert split_sizes == {1: len(lengths)} and split_tokens == 1
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-5)  # rows back in order, equal values


def test_passes_of_one_row_requests_keep_the_token_budget(loaded):
    """A one-row newcomer would not go before other one-row requests, so their shared pass is not cut
    to --max-pass-ms (that would only cost throughput: issue 13's one-sentence-per-call traffic)."""
    async def scenario():
        engine, info, batcher = await serving(loaded, max_wait_us=0, max_pass_ms=0.01)
        try:
            await batcher.submit(job(info, [8]))  # measured: --max-pass-ms 0.01 leaves one row per pass
            before = dict(batcher.stats.sizes)
            # Queued in one turn of the event loop, before the collector wakes: they share one pass.
            await asyncio.gather(*(batcher.submit(job(info, [10])) for _ in range(8)))
            return {k: v - before.get(k, 0) for k, v in batcher.stats.sizes.items() if v != before.get(k, 0)}, \
                batcher.pass_tokens()
        finally:
            await closing(engine, batcher)

    sizes, pass_tokens = asyncio.run(scenario())
    assert pass_tokens == 1 and sizes == {8: 1}


def test_pass_tokens_follow_the_measured_cost(loaded):
    async def scenario():
        engine, info, batcher = await serving(loaded, token_budget=4096, overhead_tokens=10, max_pass_ms=50)
        try:
            unmeasured = batcher.pass_tokens()
            batcher.cost.observe(seconds=1.0, padded_tokens=990)  # 1 ms per token-equivalent
            measured = batcher.pass_tokens()
            batcher.cost.seconds_per_token = 1e-7  # a much faster engine: the token budget rules
            return unmeasured, measured, batcher.pass_tokens()
        finally:
            await closing(engine, batcher)

    # Nothing measured: --token-budget; then 50 ms / 1 ms less the pass's own 10 token-equivalents.
    assert asyncio.run(scenario()) == (4096, 40, 4096)


def test_max_pass_ms_must_be_a_finite_number_at_least_zero(loaded):
    engine = Engine(loaded, torch_threads=1, forward_workers=1)
    try:
        for bad in (-1.0, float("inf"), float("nan")):
            with pytest.raises(ConfigurationError, match="--max-pass-ms"):
                Batcher(engine, None, max_pass_ms=bad)
    finally:
        engine.close()


def test_a_small_request_takes_the_place_of_queued_passes_of_a_large_one(loaded):
    """Issue 12: a one-sentence call waited behind every pass already cut from a flood's rows (4-5 s).
    With the engine held, the batcher queues one batch per forward worker and one more, all cut from
    the large request; the small one arriving then is computed in the first pass the engine starts."""
    async def scenario():
        # --max-pass-ms 0: the large request is three passes of 4 rows whatever the machine's speed.
        engine, info, batcher = await serving(loaded, max_batch_size=4, max_wait_us=0, max_pass_ms=0)
        gate, inside = threading.Event(), threading.Event()

        def hold():
            inside.set()
            gate.wait(30)

        try:
            blocker = asyncio.ensure_future(engine.run(hold))
            await asyncio.to_thread(inside.wait, 10)
            done: list[str] = []

            async def call(name, lengths):
                result = await batcher.submit(job(info, lengths))
                done.append(name)
                return result

            large = asyncio.ensure_future(call("large", [12] * 12))  # three passes of 4 rows
            slots = engine.forward_workers + 1
            await until(lambda: not batcher.queue_rows  # revoked batches stay in _running: not counted
                        and sum(not b.revoked for b in batcher._running.values()) == slots,
                        f"the large request's {slots} passes handed to the held engine", failed=[large])
            small = asyncio.ensure_future(call("small", [12]))
            await until(lambda: batcher._arrivals == 2, "the small request queued", failed=[small])
            gate.set()
            await blocker
            small_result, large_result = await small, await large
            return done, small_result.batch_size, large_result, await batcher.submit(job(info, [12] * 12))
        finally:
            gate.set()
            await closing(engine, batcher)

    done, small_batch, large, large_again = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert done == ["small", "large"]
    assert small_batch <= 4
    np.testing.assert_allclose(large.outputs["logits"], large_again.outputs["logits"], rtol=1e-4, atol=1e-5)


def test_after_a_one_row_request_passes_for_others_leave_a_worker_free(loaded, monkeypatch):
    """Issue 12: a one-sentence call under a flood waited for a forward worker (each busy with a pass of
    the flood, one row of ~200 tokens being the least a pass can hold). For RESERVE_SECONDS after a
    one-row request, passes for larger requests hold at most forward_workers - 1 workers; later, all of
    them. The reserve is held long while the large request computes (16 passes of one row outlasted
    its 1 s on a loaded machine), then back at its 1 s, which the test waits out."""
    reserve = batcher_module.RESERVE_SECONDS
    monkeypatch.setattr(batcher_module, "RESERVE_SECONDS", 600.0)
    async def scenario():
        engine, info, batcher = await serving(loaded, max_wait_us=0, max_pass_ms=0.01)
        most = {"reserved": 0, "free": 0}
        phase = "reserved"

        async def sample():
            while True:
                held = sum(not b.revoked and len(b.rows[0].pending.job.rows) > 1 for b in batcher._running.values())
                most[phase] = max(most[phase], held)
                await asyncio.sleep(0)

        sampler = asyncio.ensure_future(sample())
        try:
            await batcher.submit(job(info, [8]))  # a one-row request: the reserve starts
            await batcher.submit(job(info, [20] * 16))  # one row per pass (--max-pass-ms 0.01)
            monkeypatch.setattr(batcher_module, "RESERVE_SECONDS", reserve)
            await asyncio.sleep(reserve + 0.1)  # the reserve lapses
            phase = "free"
            await batcher.submit(job(info, [20] * 16))
            return most, engine.forward_workers
        finally:
            sampler.cancel()
            await closing(engine, batcher)

    most, workers = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert workers == 2
    assert most["reserved"] == 1 and most["free"] == workers + 1, most


def test_a_request_served_in_part_does_not_wait_behind_every_newcomer(loaded):
    """Least attained service alone puts a request served in part behind every fresh one, forever under
    sustained load; once it has waited AGED_SECONDS it goes first (after one-row requests), by arrival."""
    from model_service import batcher as batcher_module

    engine = Engine(loaded, torch_threads=1, forward_workers=1)
    info = discover(engine, "tc", 32)
    engine.close()
    future = None
    old = batcher_module._Pending(job(info, [5, 6, 7]), future, None, False, order=1, arrived=100.0)
    old.taken, old.waiting = 2, old.waiting[2:]
    fresh = batcher_module._Pending(job(info, [5, 6]), future, None, False, order=2, arrived=101.5)
    one_row = batcher_module._Pending(job(info, [5]), future, None, False, order=3, arrived=101.9)

    def order(now):
        aged_before = now - batcher_module.AGED_SECONDS
        pendings = sorted([old, fresh, one_row], key=lambda p: batcher_module._service_key(p, aged_before))
        return [p.order for p in pendings]

    assert order(now=101.0) == [3, 2, 1]  # not aged yet: least attained service
    assert order(now=102.5) == [3, 1, 2]  # aged: before the newer request, still after the one-row one



def test_a_padding_free_engine_puts_rows_of_any_length_in_one_pass(loaded):
    """Rows of 4 and of 60 tokens: padded, one pass would compute 16 x 60 tokens, so plan_groups cuts two
    passes; with the padding-free engine (BERT: packed_bert.py) a pass costs the rows' own tokens and all
    16 share one. The answers are the same either way."""
    lengths = [4] * 8 + [60] * 8

    async def run(engine_name):
        engine = Engine(loaded, torch_threads=1, forward_workers=2, backend=engine_name)
        info = await engine.run(discover, engine, "tc", 32)
        batcher = Batcher(engine, info, max_wait_us=0, max_pass_ms=0, overhead_tokens=64)
        batcher.start()
        try:
            result = await batcher.submit(job(info, lengths))
            return result, batcher.stats.batches
        finally:
            await closing(engine, batcher)

    packed, packed_passes = asyncio.run(run("eager"))
    padded, padded_passes = asyncio.run(run("eager-padded"))
    assert (packed_passes, packed.batch_size) == (1, 16)
    assert (padded_passes, padded.batch_size) == (2, 8)
    np.testing.assert_allclose(packed.outputs["logits"], padded.outputs["logits"], atol=1e-5)
