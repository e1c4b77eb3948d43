"""The batcher under a blocked engine (in-process server on loopback): full queue, stale requests
dropped before compute, and the length grouping plan."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch

from client.tensor_client import AsyncTensorClient
from model_service import batcher, cli, server
from model_service.batcher import plan_groups
from tests import model_factory
from tests.model_service_helpers import until


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tokenizer = model_factory.build_encoder("text-classification", seed=2)
    return model_factory.save_components(tmp_path_factory.mktemp("batching") / "tc", model, tokenizer,
                                         "text-classification")


def row(n: int) -> dict:
    return {"input_ids": np.arange(2, 2 + n, dtype=np.int64)[None, :]}


# No scenario may hang the suite: a wait that can never end (CI once sat 80 minutes in one) fails instead.
SCENARIO_SECONDS = 180


async def with_server(model_dir, *flags, scenario):
    args = cli.parse_args(["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "0", "--http-port", "0", *flags])
    running = await server.start(args)
    try:
        async with AsyncTensorClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            return await asyncio.wait_for(scenario(running.runtime, client), SCENARIO_SECONDS)
    finally:
        await server.shutdown(running)


# A deadline (s) long enough that admission by expected wait never refuses a test's call, however slow
# the measured cost per token on a loaded machine (the client's default of 60 s once was not).
NO_REFUSAL = 3600.0


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
        # While blocked at most 3 batches x 4 rows are in flight and 4 rows may wait: 20 calls overflow.
        calls = [asyncio.ensure_future(client.infer(row(3 + i % 5), outputs=["logits"])) for i in range(20)]
        await until(lambda: runtime.batcher.stats.rejected_full > 0, "a call refused for a full queue")
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


# The deadline of a caller that goes away while queued: long enough to reach the queue on a loaded machine
# (the tests wait until it has), short enough to pass soon after.
GONE_SECONDS = 5.0


def test_caller_gone_before_compute_is_dropped(model_dir):
    async def scenario(runtime, client):
        stats = runtime.batcher.stats
        gate, started, blocker = block_engine(runtime)
        await asyncio.to_thread(started.wait, 10)
        rows_before, arrivals = stats.rows, runtime.batcher._arrivals
        # A deadline long enough for the call to reach the batcher on a loaded machine (0.5 s once could pass
        # before it did: nothing was dropped); it passes while the call waits behind the blocked engine.
        call = asyncio.ensure_future(client.infer(row(5), outputs=["logits"], timeout=GONE_SECONDS))
        await until(lambda: runtime.batcher._arrivals == arrivals + 1, "the call in the batcher", failed=[call])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
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


def rows(count: int, length: int) -> dict:
    return {"input_ids": np.tile(np.arange(2, 2 + length, dtype=np.int64), (count, 1))}


async def fill_in_flight(runtime, client):
    """Block the engine and let the batcher hand it every batch it may have in flight (one per forward
    worker, and one more): what is sent next waits in the queue. The server must run with
    --max-batch-size 4 and --max-pass-ms 0, so each 4-row request is one pass whatever the measured
    cost per token (a cut of the passes by time once needed more passes than slots: the wait never ended)."""
    assert runtime.batcher.max_batch_size == 4 and not runtime.batcher.max_pass
    gate, started, blocker = block_engine(runtime)
    await asyncio.to_thread(started.wait, 10)
    slots = runtime.engine.forward_workers + 1
    in_flight = []
    # One request at a time, each handed to the engine before the next is sent: sent together, the third
    # could find the first two still queued and be refused by a test's --max-queue-rows 8 (CI saw it).
    # A revoked batch stays in _running until a worker reaches it, so only the others are counted.
    for handed in range(1, slots + 1):
        in_flight.append(asyncio.ensure_future(client.infer(rows(4, 5), outputs=["logits"])))
        await until(lambda n=handed: not runtime.batcher.queue_rows
                    and sum(not b.revoked for b in runtime.batcher._running.values()) == n,
                    f"{handed} of {slots} passes handed to the blocked engine", failed=in_flight)
    return gate, blocker, in_flight


def test_a_request_that_goes_away_takes_its_queued_rows_with_it(model_dir):
    """Issue: a caller's cancelled or timed-out work stayed queued, so the next callers were refused."""
    async def scenario(runtime, client):
        gate, blocker, in_flight = await fill_in_flight(runtime, client)
        gone = [asyncio.ensure_future(client.infer(rows(4, 6), outputs=["logits"], timeout=GONE_SECONDS))
                for _ in range(2)]
        await until(lambda: runtime.batcher.queue_rows >= 8, "the two callers' 8 rows queued", failed=gone)
        timed_out = await asyncio.gather(*gone, return_exceptions=True)
        # The server hears of the deadline about when the client does (later on a loaded machine): the engine
        # is still blocked, so only taking the gone callers' rows out can empty the queue.
        await until(lambda: not runtime.batcher.queue_rows, "the timed-out callers' rows taken out of the queue")
        # The queue (8 rows) was full of the timed-out caller's rows: a new caller now gets in.
        newcomer = asyncio.ensure_future(client.infer(rows(4, 7), outputs=["logits"]))
        await until(lambda: runtime.batcher.queue_rows == 4, "the newcomer's rows queued", failed=[newcomer])
        gate.set()
        await blocker
        return timed_out, await newcomer, await asyncio.gather(*in_flight)

    timed_out, newcomer, in_flight = asyncio.run(with_server(
        model_dir, "--max-batch-size", "4", "--max-queue-rows", "8", "--max-wait-us", "0", "--max-pass-ms", "0",
        scenario=scenario))
    assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
               for e in timed_out)
    assert newcomer["logits"].shape == (4, 3) and all(r["logits"].shape == (4, 3) for r in in_flight)


def test_a_small_request_passes_a_queued_flood(model_dir):
    """Issue: one caller's large request made every later small one wait behind all of it."""
    async def scenario(runtime, client):
        gate, blocker, in_flight = await fill_in_flight(runtime, client)
        done: list[str] = []

        async def call(name, inputs):
            await client.infer(inputs, outputs=["logits"])
            done.append(name)

        flood = [asyncio.ensure_future(call(f"flood{i}", rows(4, 12))) for i in range(30)]
        await until(lambda: runtime.batcher.queue_rows >= 120, "the flood's 120 rows queued")
        small = asyncio.ensure_future(call("small", rows(1, 12)))
        await until(lambda: runtime.batcher.queue_rows >= 121, "the small call's row queued")
        gate.set()
        await blocker
        await asyncio.gather(small, *flood, *in_flight)
        return done

    done = asyncio.run(with_server(model_dir, "--max-batch-size", "4", "--max-wait-us", "0", "--max-pass-ms", "0",
                                   scenario=scenario))
    # Fair sharing: it rides in the first forward pass after the two already computing, and no flood
    # request ran whole before it (each forward pass gave every waiting request at most one row).
    assert done.index("small") <= 1, done


# The backlog queued before the refused call: few enough to be in flight at once (2,300 calls in flight were
# CANCELLED); its forward work must look like at least BACKLOG_SECONDS to the batcher's cost model.
BACKLOG_REQUESTS = 400
BACKLOG_SECONDS = 4.0
# The refused caller's deadline: far below the backlog's work, far above a loaded machine's round trip (a fixed
# 0.05 s, and a quarter of the work measured on the tiny model, ~0.03 s, both once expired before the refusal).
REFUSED_DEADLINE = 0.5


def test_a_deadline_that_cannot_be_met_is_refused_at_once(model_dir):
    """Issue: the queue was bounded in rows, not time: accepted work waited past its caller's deadline."""
    async def scenario(runtime, client):
        for _ in range(5):  # the batcher measures its cost per token on these forward passes
            await client.infer(rows(4, 30), outputs=["logits"])
        cost = runtime.batcher.cost
        assert cost.seconds_per_token is not None
        # The tiny model's passes take well under a millisecond here: the cost is raised to what a machine on
        # which the backlog takes BACKLOG_SECONDS would measure (kept where it already is that slow).
        tokens = BACKLOG_REQUESTS * (4 * 30 + cost.overhead_tokens)
        cost.seconds_per_token = max(cost.seconds_per_token, BACKLOG_SECONDS * runtime.engine.forward_workers / tokens)
        gate, blocker, in_flight = await fill_in_flight(runtime, client)
        backlog = [asyncio.ensure_future(client.infer(rows(4, 30), outputs=["logits"], timeout=NO_REFUSAL))
                   for _ in range(BACKLOG_REQUESTS)]
        await until(lambda: runtime.batcher.queue_rows >= 4 * BACKLOG_REQUESTS, "the backlog queued", failed=backlog)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.infer(rows(4, 30), outputs=["logits"], timeout=REFUSED_DEADLINE)
        waited = loop.time() - started
        # A caller with time enough is still served, after the backlog.
        patient = asyncio.ensure_future(client.infer(rows(1, 30), outputs=["logits"], timeout=NO_REFUSAL))
        gate.set()
        await blocker
        await asyncio.gather(*backlog, *in_flight)
        return refused.value, waited < REFUSED_DEADLINE, await patient, runtime.batcher.stats

    refused, at_once, patient, stats = asyncio.run(with_server(
        model_dir, "--max-batch-size", "4", "--max-wait-us", "0", "--max-pass-ms", "0", "--max-queue-rows", "100000",
        # Lone passes on every thread do not feed the cost model: none here.
        "--torch-threads", "1", "--lone-pass-ms", "0", scenario=scenario))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "cannot answer within the deadline" in refused.details() and "ms per token" in refused.details()
    assert at_once and stats.rejected_late == 1
    assert patient["logits"].shape == (1, 3)


def test_a_small_call_is_answered_before_the_last_pass_of_a_flood_computing(model_dir):
    """Issue 12: under two callers' floods a one-sentence call waited 4-5 s, behind forward passes of
    up to --token-budget padded tokens already cut from the floods' rows. Here the flood computes
    (one forward worker, real passes): with passes cut to about --max-pass-ms (one row each at
    0.01 ms) and a queued pass giving way to it, the small call is answered before any flood call;
    before, each flood request was one pass and the small call came after the one computing and
    the one queued."""
    async def scenario(runtime, client):
        done: list[str] = []

        async def call(name, inputs):
            # No deadline that admission could find too short: the measured cost of a loaded machine made
            # the client's 60 s look too little, the flood was refused and no pass of it ever came.
            await client.infer(inputs, outputs=["logits"], timeout=NO_REFUSAL)
            done.append(name)

        await call("warm-up", rows(1, 12))  # the batcher measures its cost per token
        done.clear()
        flood = [asyncio.ensure_future(call(f"flood{i}", rows(16, 40))) for i in range(2)]
        await until(lambda: runtime.batcher.stats.batches >= 2, "a pass of the flood done", poll=0.001,
                    failed=flood)
        small = asyncio.ensure_future(call("small", rows(1, 12)))
        await asyncio.gather(small, *flood)
        return done, runtime.batcher.stats

    # One torch thread: on a loaded node a pass on more spins at every barrier (74 s for this test at load 30).
    done, stats = asyncio.run(with_server(model_dir, "--forward-workers", "1", "--torch-threads", "1",
                                          "--max-wait-us", "0", "--max-pass-ms", "0.01", scenario=scenario))
    assert done[0] == "small", done
    assert stats.largest_batch == 1 and stats.batches == 2 + 2 * 16


def test_base_model_batches_run_on_the_forward_workers(model_dir):
    """Issue: every request's adapter is leased as BASE when it names none, and the batcher took any
    name for an adapter, so every forward pass ran alone on the main worker: --forward-workers did
    nothing in the server."""
    async def scenario(runtime, client):
        threads: set[str] = set()
        forward = runtime.engine.forward

        def recording(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return forward(*args, **kwargs)

        runtime.engine.forward = recording
        await asyncio.gather(*(client.infer(rows(2, 5 + i), outputs=["logits"]) for i in range(4)))
        return threads

    threads = asyncio.run(with_server(model_dir, "--forward-workers", "2", scenario=scenario))
    assert threads and all(name.startswith("forward") for name in threads), threads


def test_a_lone_pass_runs_on_every_workers_threads_and_overlapping_passes_on_their_share(model_dir, monkeypatch):
    """Issue 13: at concurrency 1 each one-row pass ran on one forward worker's single torch thread
    while the other worker's core idled. A pass with nothing else computing or waiting may now run
    alone on the main worker with both workers' threads: lone passes start on a worker's share and
    after 4 of them try every thread for 4 (StepThreads), keeping whichever costs less. Passes cut
    while other rows wait always keep one thread each, and so does every pass while the node's cores
    are busy (the node's load average, set here: this machine's load is whatever the other jobs make it)."""
    load = [0.5]
    monkeypatch.setattr(batcher, "node_load", lambda: load[0])

    async def scenario(runtime, client):
        seen: list[tuple[str, int, int]] = []  # (thread, torch threads, rows) per forward pass
        forward = runtime.engine.forward

        def recording(inputs, *args, **kwargs):
            seen.append((threading.current_thread().name, torch.get_num_threads(), len(inputs["input_ids"])))
            return forward(inputs, *args, **kwargs)

        async def passes(*requests):
            seen.clear()
            for request in requests:
                await client.infer(request, outputs=["logits"])
            return list(seen)

        runtime.engine.forward = recording
        first = await passes(rows(1, 5))  # the first pass measures the cost per token
        large = await passes(rows(8, 6))  # cut one row per pass (--max-pass-ms 0.01)
        lone = await passes(*(rows(1, length) for length in range(7, 15)))  # one at a time: each alone
        load[0] = runtime.engine.cpus + 2.0  # a loaded node: more runnable work than cores
        busy = await passes(*(rows(1, length) for length in range(7, 15)))
        return first, large, lone, busy, runtime.batcher.stats

    first, large, lone, busy, stats = asyncio.run(with_server(
        model_dir, "--forward-workers", "2", "--torch-threads", "1", "--max-wait-us", "0", "--max-pass-ms", "0.01",
        "--lone-pass-ms", "60000", scenario=scenario))
    assert [(name[:7], threads) for name, threads, _ in first] == [("forward", 1)]  # no cost measured yet
    assert len(large) == 8 and all(n == 1 for _, _, n in large)
    # Every pass but the last had rows of its request waiting: a forward worker with its one thread.
    assert sum(name.startswith("forward") for name, _, _ in large[:-1]) == 7, large
    passes = first + large + lone + busy
    assert all(threads == (2 if name.startswith("engine") else 1) for name, threads, _ in passes), passes
    wide = [name.startswith("engine") for name, _, _ in lone]
    assert wide[:3] == [False] * 3 and sum(wide) >= 4, lone  # the share first, then every thread tried
    assert [name[:7] for name, _, _ in busy] == ["forward"] * 8, busy
    assert stats.lone_wide == sum(name.startswith("engine") for name, _, _ in passes)


def test_the_lone_pass_guard_leaves_out_the_services_own_recent_cpu(model_dir, monkeypatch):
    """Issue 13: right after a busy minute the node's load average is mostly model_service's own forward
    passes, which kept every lone pass narrow on an idle node. The guard now takes this process's own
    recent CPU (RecentCpu) out of the average: the same load average with one core of it our own lets lone
    passes go wide (StepThreads: 4 on a worker's share, then 4 on every thread), with none of it our own
    they stay on a worker. Load and own CPU are set here; --lone-pass-ms is pinned high so the measured
    cost per token (this machine's speed) cannot keep a pass from being a lone candidate."""
    own = [0.0]
    monkeypatch.setattr(batcher, "node_load", lambda: cpus[0] + 1.5)  # over the bound of cores + 1
    monkeypatch.setattr(batcher.RecentCpu, "cores", lambda self: own[0])
    cpus = [0]

    async def scenario(runtime, client):
        cpus[0] = runtime.engine.cpus
        threads: list[str] = []
        forward = runtime.engine.forward

        def recording(inputs, *args, **kwargs):
            threads.append("engine" if threading.current_thread().name.startswith("engine") else "forward")
            return forward(inputs, *args, **kwargs)

        runtime.engine.forward = recording
        await client.infer(rows(1, 5), outputs=["logits"])  # the first pass measures the cost per token
        threads.clear()
        for length in range(6, 14):
            await client.infer(rows(1, length), outputs=["logits"])
        others = list(threads)
        own[0] = 1.0
        threads.clear()
        for length in range(6, 14):
            await client.infer(rows(1, length), outputs=["logits"])
        return others, list(threads)

    others, ours = asyncio.run(with_server(
        model_dir, "--forward-workers", "2", "--torch-threads", "1", "--max-wait-us", "0",
        "--lone-pass-ms", "60000", scenario=scenario))
    assert others == ["forward"] * 8, others
    assert ours == ["forward"] * 4 + ["engine"] * 4, ours


def test_recent_cpu_averages_the_process_cpu_as_the_load_average_does():
    """One core used for a minute reads 1 - 1/e cores, as a runnable thread moves the 1-minute load average;
    an idle minute after it decays that by 1/e."""
    now, used = [0.0], [0.0]
    recent = batcher.RecentCpu(clock=lambda: now[0], cpu=lambda: used[0])
    assert recent.cores() == 0.0
    now[0], used[0] = 60.0, 60.0
    assert recent.cores() == pytest.approx(1 - np.exp(-1))
    now[0] = 120.0
    assert recent.cores() == pytest.approx((1 - np.exp(-1)) * np.exp(-1))
    assert recent.cores() == pytest.approx((1 - np.exp(-1)) * np.exp(-1))  # no time passed: unchanged


def test_a_request_arriving_during_a_lone_pass_waits_for_it_instead_of_running_beside(model_dir, monkeypatch):
    """A pass beside a lone one on every thread would put more runnable threads than cores (OpenMP teams
    then stall at their barriers): the newcomer's pass starts when the lone one ends."""
    monkeypatch.setattr(batcher, "node_load", lambda: 0.5)  # an idle node, whatever this machine's load
    # --lone-pass-ms pinned high: on a loaded machine the measured cost per token could put a tiny pass over 30 ms

    async def scenario(runtime, client):
        events: list[tuple[str, str]] = []  # ("start" | "end", thread) per forward pass, in order
        forward = runtime.engine.forward
        wide_started, release = threading.Event(), threading.Event()

        def recording(inputs, *args, **kwargs):
            name = threading.current_thread().name
            events.append(("start", name))
            if name.startswith("engine") and not release.is_set():
                wide_started.set()
                release.wait(30)
            try:
                return forward(inputs, *args, **kwargs)
            finally:
                events.append(("end", name))

        runtime.engine.forward = recording
        for length in range(5, 10):  # the cost, then 4 lone passes on a worker's share (StepThreads)
            await client.infer(rows(1, length), outputs=["logits"])
        events.clear()
        lone = asyncio.ensure_future(client.infer(rows(1, 10), outputs=["logits"]))  # tries every thread
        await asyncio.to_thread(wide_started.wait, 30)
        arrivals = runtime.batcher._arrivals
        newcomer = asyncio.ensure_future(client.infer(rows(1, 11), outputs=["logits"]))
        # In the batcher (on a loaded machine the call may take longer than the 0.3 s below to get there, and
        # the check would prove nothing), then time for a wrong start on a worker to show.
        await until(lambda: runtime.batcher._arrivals == arrivals + 1, "the newcomer in the batcher", failed=[newcomer])
        await asyncio.sleep(0.3)
        during = list(events)
        release.set()
        await asyncio.gather(lone, newcomer)
        return during, events

    during, events = asyncio.run(with_server(
        model_dir, "--forward-workers", "2", "--torch-threads", "1", "--max-wait-us", "0", "--lone-pass-ms", "60000",
        scenario=scenario))
    assert during == [("start", during[0][1])] and during[0][1].startswith("engine"), during
    assert events[:2] == [("start", during[0][1]), ("end", during[0][1])] and len(events) == 4, events
