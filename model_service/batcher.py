"""Dynamic batching: rows from concurrent requests (unary and streamed alike) share forward passes.

Each request is split into rows (unpadded sequences). While every forward worker is busy, the
collector waits up to `max_wait_us` (counted from the oldest row's arrival) for `max_batch_size`
rows; with a worker idle it goes at once, as waiting would only add latency. It then sorts the waiting rows
by length and cuts them into groups that minimise padded tokens plus a per-forward overhead
(`plan_groups`), within `token_budget` padded tokens; the group holding the oldest row runs
next. Padding a mixed batch to its longest row costs up to ~3x on real text; with a padding-free
engine (`engine.backend.padding_free`, backends.py) a pass costs its rows' own tokens, and groups are
cut by row count and token budget only. Rows of
different adapters mix in one batch (see engine.py). Each forward worker (`engine.forward_workers`)
computes a batch and one more waits queued, so no worker waits for the event loop; a batch with
adapter rows runs alone (the adapters change the model around it).

Lone passes: a pass with nothing else computing, queued or waiting (concurrency 1, the first of a
burst), expected to take at most `lone_pass_ms` on one forward worker, runs on the engine's main
worker, alone, with every worker's torch threads: a one-row pass alone on a one-thread worker left
the other cores idle (~6 ms more per MiniLM sentence on 2 cores). Passes that overlap keep their
worker's share. A request arriving during a lone pass waits for it (it holds every core; running
beside it would put more runnable threads than cores, whose OpenMP barriers then stall), which the
bound keeps short. On cores shared with busy processes a pass with several threads can cost many
times more (threads spin at each barrier), so the lone passes measure it: they keep whichever of
all threads or the worker's share cost less per token, probing the other now and then
(`StepThreads`, as the generation steps do). Lone passes on every thread do not feed `ForwardCost`,
which is the cost of a pass on one forward worker.

Time per pass: a forward pass cannot be interrupted, so whatever arrives while every worker is busy
waits for the passes computing. A pass cut for a request of several rows, or one already served in
part, is therefore held to about `max_pass_ms` (from `ForwardCost`: its padded tokens within
`max_pass_ms / seconds per token - overhead`; one row always fits), on top of `token_budget`. A large
request then runs as a sequence of short length-sorted passes, and a one-row request that arrives
meanwhile (it goes first in the order below) waits for about one of them instead of passes of up to
`token_budget` tokens (measured: seconds each on 2 CPU cores). Passes cut for one-row requests keep
`token_budget` alone (and only their rows): a newcomer would not go before them, so shorter passes
would only cost throughput. A batch that is queued but not yet started is only a reservation: a request that
arrives and comes first in the order below takes its place (the batch's rows go back to the queue
and are planned again with it). And for `RESERVE_SECONDS` after a one-row request arrived, passes
for long requests (`LONG_REQUEST_PASSES`) use at most `forward_workers - 1` workers (with two or
more): the next one-row request finds a worker free instead of waiting for a pass (the long ones'
throughput drops while short ones come). Passes for long requests run on the engine's niced forward
workers (`engine.run_bulk_forward`, --forward-bulk-nice), so the one-row request's pass computing
beside them gets most of the CPU rather than half.

Sharing between requests: the rows offered to a forward pass (4 x max_batch_size, `VIEW`) come
from the waiting requests in least-attained-service order (fewest rows computed so far, then
fewest rows waiting, then arrival), at most an equal share from each. A small request that
arrives behind a flood of large ones therefore rides in the next forward pass, and no request
fills a pass while others wait. A request waiting longer than `AGED_SECONDS` goes before the
newer ones (but after one-row requests), by arrival, so under sustained load none starves.

Admission, before any work: a request is refused with RESOURCE_EXHAUSTED at once when the queue
holds `max_queue_rows` rows, or when its deadline cannot be met: the expected time to finish it
comes from `ForwardCost` (a per-pass overhead plus a measured cost per padded token) over the
tokens it must share the worker with under fair sharing (each waiting request's tokens up to its
own size, its own, and the batches computing). A request that goes away (cancelled, deadline passed, failed)
takes all of its queued rows with it at once.

The forward pass, padding and the cut back per request all run on the engine's worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from model_service import shaping
from model_service.requests import InferJob
from model_service.threads import StepThreads
from splitserve_common import metrics, tracing
from splitserve_common.errors import ConfigurationError, DeadlineExceeded, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

# Rows offered to the plan of one pass, in units of max_batch_size: a wider view groups rows of closer
# lengths (bench/batching_ceiling.py, one request of 2,000 sentences: 0.90 of sorted batches at 4, 0.88 at 1).
VIEW = 4
# For this long after a one-row request arrived, passes for long requests leave one forward worker free
# (with two or more): a one-row request then waits for no pass at all, only for its own.
RESERVE_SECONDS = 1.0
# A request is long when its waiting rows need more than this many passes of --max-pass-ms. Only long
# requests give up a worker to one-row ones: holding one back from short requests' passes (which a
# one-row request waits for briefly anyway) halved the throughput of a soak of 1-8 sentence requests.
LONG_REQUEST_PASSES = 8
# A request waiting longer than this goes before newer ones that are not one row (arrival order):
# under least attained service alone, a request served in part waited behind every newcomer (a soak
# at saturation saw 60 s deadlines pass).
AGED_SECONDS = 2.0


@dataclass
class BatchStats:
    """Counters a test or the metrics endpoint can read."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    dropped_deadline: int = 0
    dropped_cancelled: int = 0
    rejected_full: int = 0
    rejected_late: int = 0   # refused at once: the deadline could not be met
    lone_wide: int = 0       # lone passes run with every worker's torch threads
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches


@dataclass
class Result:
    outputs: dict          # output name -> numpy array
    batch_size: int        # rows in the largest forward pass this request was part of


def _service_key(pending: _Pending, aged_before: float = float("-inf")) -> tuple:
    """The order requests are served in. First one-row requests not served yet (by arrival); then requests
    that arrived before `aged_before` (AGED_SECONDS ago), by arrival, so that none starves while newer
    ones keep coming; then least attained service: fewest rows computed so far, then fewest rows
    waiting, then arrival."""
    if pending.taken == 0 and len(pending.waiting) == 1:
        return 0, pending.order
    if pending.arrived < aged_before:
        return 1, pending.order
    return 2, pending.taken, len(pending.waiting), pending.order


def _one_row(key: tuple) -> bool:
    """The request of this service key is one row, none served yet: nothing would go before it."""
    return key[0] == 0


class _Pending:
    """One request in flight: its rows wait in `waiting` until taken; outputs collect until all are computed."""

    def __init__(self, job: InferJob, future: asyncio.Future, deadline: float | None, needs_hidden: bool,
                 order: int, arrived: float):
        self.job = job
        self.future = future
        self.deadline = deadline            # time.monotonic() value, or None
        self.needs_hidden = needs_hidden
        self.order = order                  # arrival number
        self.arrived = arrived              # event loop time
        self.waiting = [_Row(self, i, arrived) for i in range(job.batch)]
        self.waiting_tokens = sum(row.length for row in self.waiting)
        self.taken = 0                      # rows handed to forward passes so far
        self.row_outputs: list[dict | None] = [None] * job.batch
        self.remaining = job.batch
        self.batch_size = 0
        self.dropped = False
        self.trace = tracing.current_context()  # the caller's span, for its queue and forward spans


@dataclass
class _Row:
    pending: _Pending
    index: int
    arrived: float             # event loop time

    @property
    def length(self) -> int:
        return len(self.pending.job.rows[self.index])

    @property
    def shape(self) -> tuple:
        return self.pending.job.rows[self.index].shape


class _Batch:
    """Rows taken for one forward pass. Until a worker starts it, a request that should go first may
    revoke it (its rows go back to the queue); `started` and `revoked` change under the batcher's lock."""

    def __init__(self, rows: list[_Row], key: tuple, tokens: int):
        self.rows = rows
        self.key = key          # the service key of the request it was cut for, when it was cut
        self.tokens = tokens    # padded tokens plus the per-pass overhead, for the expected wait
        self.started = False
        self.revoked = False
        self.lone = False       # nothing else computing, queued or waiting when it was cut (and short)
        self.wide = False       # runs alone with every worker's threads (a lone pass, when that measured faster)
        self.bulk = False       # cut for a long request: runs on the engine's niced workers (run_bulk_forward)


class ForwardCost:
    """Seconds of forward passes: `overhead_tokens` token-equivalents per pass (--batch-overhead-tokens,
    as in `plan_groups`) plus the padded tokens, at a cost per token-equivalent measured as an
    exponential average over recent passes. Without the per-pass term, the fixed cost of small passes
    would be charged per token and inflate the estimate of large ones many times over."""

    SMOOTHING = 0.2  # weight of the newest pass

    def __init__(self, overhead_tokens: int):
        self.overhead_tokens = overhead_tokens
        self.seconds_per_token: float | None = None  # None until the first pass is measured

    def observe(self, seconds: float, padded_tokens: int) -> None:
        cost = seconds / max(padded_tokens + self.overhead_tokens, 1)
        self.seconds_per_token = cost if self.seconds_per_token is None else \
            (1 - self.SMOOTHING) * self.seconds_per_token + self.SMOOTHING * cost

    def estimate(self, tokens: int, passes: int) -> float | None:
        """Seconds for `passes` forward passes over `tokens` in all (None: nothing measured yet)."""
        if self.seconds_per_token is None:
            return None
        return (tokens + passes * self.overhead_tokens) * self.seconds_per_token

    def tokens_within(self, seconds: float) -> int | None:
        """Padded tokens one pass may hold to take about `seconds` (None: nothing measured yet)."""
        if self.seconds_per_token is None:
            return None
        return max(1, int(seconds / self.seconds_per_token) - self.overhead_tokens)


class Batcher:
    def __init__(self, engine, info, max_batch_size: int = 32, max_wait_us: int = 2000, token_budget: int = 16384,
                 max_queue_rows: int = 1024, overhead_tokens: int = 64, max_pass_ms: float = 50.0,
                 lone_pass_ms: float = 30.0):
        self.engine = engine
        self.info = info
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_us / 1e6
        self.token_budget = token_budget
        self.max_queue_rows = max_queue_rows
        self.overhead_tokens = overhead_tokens
        if not 0 <= max_pass_ms < float("inf"):
            raise ConfigurationError(f"--max-pass-ms must be a finite number of milliseconds >= 0, not {max_pass_ms}")
        self.max_pass = max_pass_ms / 1e3     # 0: passes bounded by token_budget only
        if not 0 <= lone_pass_ms < float("inf"):
            raise ConfigurationError(f"--lone-pass-ms must be a finite number of milliseconds >= 0, not {lone_pass_ms}")
        self.lone_pass = lone_pass_ms / 1e3   # 0: every pass on a forward worker, with its share of the threads
        # Lone passes: every worker's threads, or one worker's share, whichever measures cheaper per token.
        # They start on the share (safe on a busy node) and try every thread after a few passes.
        self.lone_threads = StepThreads(engine.torch_threads * engine.forward_workers, fewest=engine.torch_threads,
                                        start_with_fewest=True, what="lone forward passes")
        self.own_cpu = RecentCpu()          # this process's share of the node's load average (lone passes)
        self._node_busy = False             # the last lone candidate found the node loaded
        self.stats = BatchStats()
        self.observers: list = []           # callables(batch_size: int, queue_rows: int) after each batch
        self.cost = ForwardCost(overhead_tokens)
        # The engine computes only the rows' own tokens (backends.py): rows of any lengths share a pass.
        self.padding_free = bool(getattr(getattr(engine, "backend", None), "padding_free", False))
        self._waiting: dict[int, _Pending] = {}  # requests with rows not yet taken, in arrival order
        self._queued_rows = 0
        self._computing_tokens = 0          # padded tokens and overhead of the batches computing
        self._arrivals = 0
        self._one_row_arrived = float("-inf")  # event loop time of the last one-row request
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[asyncio.Task, _Batch] = {}  # batches taken and not finished (started or queued)
        # One batch per forward worker computing, and one more queued, so no worker waits for the event loop.
        self._slots = asyncio.Semaphore(engine.forward_workers + 1)
        self._rows_done = threading.Lock()
        self._claims = threading.Lock()     # a worker starting a batch against the event loop revoking it

    @property
    def queue_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever(), name="batcher")

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, job: InferJob, timeout: float | None = None) -> Result:
        """Queue the job's rows and wait for its outputs. `timeout`: seconds left to the caller's deadline."""
        if self._queued_rows + job.batch > self.max_queue_rows:
            self.stats.rejected_full += 1
            raise ResourceExhausted(f"queue full: {self._queued_rows} rows waiting (limit {self.max_queue_rows}, "
                                    "--max-queue-rows); retry later")
        longest = max(len(row) for row in job.rows)
        if not job.exact_length and longest > self.token_budget:  # it could never be computed
            raise InvalidArgument(f"a row of {longest} tokens is over the {self.token_budget} padded tokens of "
                                  "one forward pass (--token-budget)")
        self._check_time(job, timeout)
        self.engine.adapters.check(job.adapter)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        needs_hidden = any(s.source not in self.info.native_outputs for s in job.outputs)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._arrivals += 1
        pending = _Pending(job, future, deadline, needs_hidden, self._arrivals, loop.time())
        self._waiting[pending.order] = pending
        self._queued_rows += job.batch
        if job.batch == 1:
            self._one_row_arrived = pending.waiting[0].arrived
        self._revoke_for(pending)
        self._wakeup.set()
        try:
            return await future
        finally:
            future.cancel()            # no-op once answered
            if future.cancelled():     # the caller went away: whatever it still had queued leaves with it
                self._withdraw(pending)
                if not pending.dropped:
                    pending.dropped = True
                    self.stats.dropped_cancelled += 1

    def expected_seconds(self, job: InferJob) -> float | None:
        """How long `job` would take to finish if queued now (None: no forward pass measured yet).

        Under fair sharing a request shares the worker with every waiting request up to its own
        size (a smaller one finishes first, a larger one keeps going after it), and waits for the
        batches already computing; the forward workers share the work."""
        own = sum(len(row) for row in job.rows)
        shared = sum(min(p.waiting_tokens, own) for p in self._waiting.values())
        rows = job.batch + sum(min(len(p.waiting), job.batch) for p in self._waiting.values())
        passes = min(rows, max(-(-rows // self.max_batch_size), -(-(shared + own) // self.pass_tokens())))
        queued = self.cost.estimate(shared + own, passes)
        if queued is None:
            return None
        computing = self._computing_tokens * self.cost.seconds_per_token
        workers = self.engine.forward_workers
        if job.batch > 1 and self._is_long(own) and self._reserving():  # all workers but one (RESERVE_SECONDS)
            workers -= 1
        return (computing + queued) / workers

    def _check_time(self, job: InferJob, timeout: float | None) -> None:
        expected = None if timeout is None else self.expected_seconds(job)
        if expected is not None and expected > timeout:
            self.stats.rejected_late += 1
            raise ResourceExhausted(
                f"cannot answer within the deadline: about {expected:.2f} s of work would run first "
                f"({self._queued_rows} rows queued, {self.cost.seconds_per_token * 1e3:.4f} ms per token measured), "
                f"{max(timeout, 0.0):.2f} s are left; retry later or with a longer deadline")

    def pass_tokens(self) -> int:
        """Most padded tokens in one forward pass: --token-budget, and what the measured cost says takes
        about --max-pass-ms."""
        within = self.cost.tokens_within(self.max_pass) if self.max_pass else None
        return self.token_budget if within is None else min(self.token_budget, within)

    def _is_long(self, tokens: int) -> bool:
        """A request with this many tokens waiting needs more than LONG_REQUEST_PASSES passes."""
        return tokens > LONG_REQUEST_PASSES * self.pass_tokens()

    def _reserving(self) -> bool:
        """A one-row request came within RESERVE_SECONDS and there are workers enough to keep one free."""
        return (self.engine.forward_workers >= 2
                and asyncio.get_running_loop().time() - self._one_row_arrived <= RESERVE_SECONDS)

    def _holding_a_worker(self) -> bool:
        """While reserving, passes for requests other than one-row ones hold all workers but one."""
        busy = sum(not b.revoked and not _one_row(b.key) for b in self._running.values())
        return self._reserving() and busy >= self.engine.forward_workers - 1

    def _is_lone(self, batch: _Batch) -> bool:
        """Nothing but `batch` to compute (no batch computing or queued, no row waiting), there are other
        workers' threads to give it, it is expected to take at most `lone_pass` on one worker, and the
        node is not loaded: its 1-minute load average less this process's own CPU use averaged alike
        (`RecentCpu`) under its cores + 1 (the rest of the stack, preproc_service and the client, still
        counts, as do this process's threads waiting for a core)."""
        own = self.own_cpu.cores()  # sampled at every cut, so that busy minutes with no lone candidate count too
        if (not self.lone_pass or self.engine.forward_workers < 2 or self._waiting
                or any(not b.revoked for b in self._running.values())
                or any(r.pending.job.adapter for r in batch.rows)):  # adapter passes run alone anyway
            return False
        expected = self.cost.estimate(batch.tokens - self.overhead_tokens, 1)
        if expected is None or expected > self.lone_pass:
            return False
        load = node_load()
        if load is None:
            return True
        busy = load - own >= self.engine.cpus + 1
        if busy != self._node_busy:  # logged when it changes, so a run's log shows why lone passes stayed narrow
            self._node_busy = busy
            log.info("lone forward passes %s: load average %.2f, %.2f of it this process's own, %d CPUs",
                     "keep a worker's share" if busy else "may use every worker's threads", load, own, self.engine.cpus)
        return not busy

    def _revoke_for(self, newcomer: _Pending) -> None:
        """Put back the rows of queued (not started) batches cut for requests that `newcomer` now goes
        before, so it rides in the next pass a worker starts rather than after them."""
        key = _service_key(newcomer)
        with self._claims:
            revoked = [b for b in self._running.values() if not b.started and not b.revoked and key < b.key]
            for batch in revoked:
                batch.revoked = True
        for batch in revoked:
            self._computing_tokens -= batch.tokens
            self._slots.release()  # the reservation's slot: the collector cuts a new batch at once
            for row in batch.rows:
                pending = row.pending
                if pending.dropped or pending.future.done():
                    continue
                position = next((i for i, r in enumerate(pending.waiting) if r.index > row.index),
                                len(pending.waiting))
                pending.waiting.insert(position, row)
                pending.waiting_tokens += row.length
                pending.taken -= 1
                self._queued_rows += 1
                self._waiting[pending.order] = pending
        if revoked:
            self._waiting = dict(sorted(self._waiting.items()))  # arrival order, for max_wait

    def _withdraw(self, pending: _Pending) -> None:
        """Take every row of `pending` that is still waiting out of the queue (its rows computing finish
        and are thrown away: `_compute` skips a dropped request's rows that have not started)."""
        if self._waiting.pop(pending.order, None) is not None:
            self._queued_rows -= len(pending.waiting)
            pending.waiting, pending.waiting_tokens = [], 0

    # ------------------------------------------------------------ collector (event loop)

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A second batch may wait in the engine's queue while one computes, so the worker never idles.
            await self._slots.acquire()
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            # max_wait counts from the oldest row's arrival: under load nobody waits on purpose. With no
            # batch computing, waiting would only add latency (nothing else is using the worker): go now.
            oldest = next(iter(self._waiting.values())).waiting[0].arrived
            busy = sum(not b.revoked for b in self._running.values()) >= self.engine.forward_workers
            wait_until = oldest + (self.max_wait if busy else 0.0)
            while self._queued_rows < self.max_batch_size and (left := wait_until - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    break
            self._drop_stale()
            batch = self._take_batch()
            if batch is None:
                self._slots.release()
                if self._waiting:  # held back: a worker stays free for one-row requests (RESERVE_SECONDS)
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), RESERVE_SECONDS)
                    except asyncio.TimeoutError:
                        pass
                continue
            batch.lone = self._is_lone(batch)
            batch.wide = batch.lone and self.lone_threads.threads() > self.engine.torch_threads
            task = loop.create_task(self._run(batch))
            self._running[task] = batch
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task) -> None:
        batch = self._running.pop(task)
        self._wakeup.set()  # a batch held back for the reserved worker may go now
        if not batch.revoked:  # a revoked batch gave its slot back when it was revoked
            self._slots.release()

    def _drop_stale(self) -> None:
        now = time.monotonic()
        for pending in list(self._waiting.values()):
            if _is_stale(pending, now):
                self._drop(pending)

    def _drop(self, pending: _Pending) -> None:
        self._withdraw(pending)
        if pending.dropped:
            return
        pending.dropped = True
        if pending.future.done():
            self.stats.dropped_cancelled += 1
        else:
            self.stats.dropped_deadline += 1
            pending.future.set_exception(DeadlineExceeded("deadline passed while the request was queued"))

    def _take_batch(self) -> _Batch | None:
        """Rows for the next forward: the length group (see plan_groups) holding the first offered row,
        within `pass_tokens()` when cut for a request a one-row newcomer would go before; a pass cut for
        a one-row request holds only one-row requests' rows.

        Rows are offered request by request in least-attained-service order, at most `share` from each."""
        if not self._waiting:
            return None
        aged_before = asyncio.get_running_loop().time() - AGED_SECONDS
        order = sorted(self._waiting.values(), key=lambda p: _service_key(p, aged_before))
        key = _service_key(order[0], aged_before)
        bulk = False
        if _one_row(key):  # a pass of one-row requests only, so other requests' rows ride in no unbounded pass
            order = [p for p in order if _one_row(_service_key(p))]
            budget = self.token_budget
        else:
            budget = self.pass_tokens()
            bulk = self._is_long(order[0].waiting_tokens)
            if bulk and self._holding_a_worker():
                return None
        view = VIEW * self.max_batch_size
        share = -(-view // len(order))
        offered: list[_Row] = []
        for pending in order:
            offered += pending.waiting[:share]
            if len(offered) >= view:
                break
        first = offered[0]
        if first.pending.job.exact_length:  # audio: only clips of the same shape share a forward
            window = [r for r in offered if r.shape == first.shape][: self.max_batch_size]
        else:
            pool = sorted(offered, key=lambda r: r.length)
            for start, end in plan_groups([r.length for r in pool], self.max_batch_size, budget,
                                          self.overhead_tokens, self.padding_free):
                window = pool[start:end]
                if any(r is first for r in window):
                    break
        for row in window:
            pending = row.pending
            pending.waiting.remove(row)
            pending.waiting_tokens -= row.length
            pending.taken += 1
            self._queued_rows -= 1
            if not pending.waiting:
                del self._waiting[pending.order]
        tokens = pass_tokens_of([r.length for r in window], self.padding_free) + self.overhead_tokens
        batch = _Batch(window, key, tokens)
        batch.bulk = bulk
        return batch

    async def _run(self, taken: _Batch) -> None:
        batch = taken.rows
        self._computing_tokens += taken.tokens
        try:
            # Rows with adapters change the model around their forward pass: those run alone ("" is the
            # base model: the servicer maps the lease's BASE to it); so does a lone pass on every thread.
            alone = taken.wide or any(r.pending.job.adapter for r in batch)
            run = self.engine.run if alone else self.engine.run_bulk_forward if taken.bulk else self.engine.run_forward
            computed = await run(self._compute, taken)
            if computed is None:  # revoked before a worker started it: its rows are queued again
                return
            finished, stale, size, seconds = computed
        except Exception as exc:  # noqa: BLE001 - the batch fails, the service keeps serving
            log.exception("forward pass failed")
            for p in {id(r.pending): r.pending for r in batch}.values():
                self._withdraw(p)  # a failed request's other rows leave the queue with it
                p.dropped = True
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            if not taken.revoked:
                self._computing_tokens -= taken.tokens
        for p in stale:  # went stale while waiting behind the previous batch
            self._drop(p)
        if size:
            computed = [r.length for r in batch if r.pending not in stale]
            tokens = pass_tokens_of(computed, self.padding_free)
            if taken.lone:
                self.lone_threads.record(seconds, tokens + self.overhead_tokens)
                self.stats.lone_wide += taken.wide
            if not taken.wide:  # ForwardCost is the cost of a pass on one forward worker's threads
                self.cost.observe(seconds, tokens)
            self.stats.batches += 1
            self.stats.rows += size
            self.stats.largest_batch = max(self.stats.largest_batch, size)
            self.stats.sizes[size] = self.stats.sizes.get(size, 0) + 1
            for observer in self.observers:
                observer(size, self._queued_rows)
        for pending, outcome in finished:
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                self._withdraw(pending)
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    # ------------------------------------------------------------ worker thread

    def _compute(self, taken: _Batch) -> tuple[list, list, int, float] | None:
        """Pad, forward and cut back: (finished (pending, Result | error), stale pendings, rows computed,
        seconds of the forward pass); None when the batch was revoked before this worker reached it."""
        with self._claims:
            if taken.revoked:
                return None
            taken.started = True
        batch = taken.rows
        now = time.monotonic()
        stale = {id(r.pending): r.pending for r in batch if _is_stale(r.pending, now)}
        batch = [r for r in batch if id(r.pending) not in stale]
        if not batch:
            return [], list(stale.values()), 0, 0.0
        for row in {id(r.pending): r for r in batch}.values():  # arrival -> forward start, per request
            metrics.observe_stage("queue", now - row.arrived)
        inputs, mask = self._pad(batch)
        needs_hidden = any(r.pending.needs_hidden for r in batch)
        adapters = [r.pending.job.adapter for r in batch]
        started = time.perf_counter()
        outputs = self.engine.forward(inputs, adapters=adapters, hidden_states=needs_hidden)
        seconds = time.perf_counter() - started
        metrics.observe_stage("forward", seconds)
        if tracing.enabled:
            _trace_batch(batch, now, seconds, torch.get_num_threads())

        length = max(r.length for r in batch)
        if _is_whole_request(batch, length):  # one request, as sent: its outputs need no cutting and restacking
            p = batch[0].pending
            p.batch_size = len(batch)
            try:
                outcome = Result(shape_outputs(p.job, outputs, mask), len(batch))
            except InvalidArgument as exc:
                outcome = exc
            return [(p, outcome)], list(stale.values()), len(batch), seconds

        finished = []
        for i, row in enumerate(batch):
            p = row.pending
            cut = not p.job.exact_length
            outputs_of_row = {
                name: (t[i, : row.length] if cut and shaping.has_sequence_axis(name, t.ndim, p.job.per_token)
                       else t[i])
                for name, t in outputs.items()
            }
            with self._rows_done:  # forward workers may finish rows of one request at the same time
                p.row_outputs[row.index] = outputs_of_row
                p.batch_size = max(p.batch_size, len(batch))
                p.remaining -= 1
                last = p.remaining == 0
            if last:
                try:
                    finished.append((p, Result(assemble(p.job, p.row_outputs), p.batch_size)))
                except InvalidArgument as exc:
                    finished.append((p, exc))
                p.row_outputs = []
        return finished, list(stale.values()), len(batch), seconds

    def _pad(self, batch: list[_Row]) -> tuple[dict, torch.Tensor]:
        """The batch's rows right-padded into model inputs on the device (main input, mask, token types),
        and the attention mask on the CPU."""
        device = self.engine.device
        job = batch[0].pending.job
        length = max(r.length for r in batch)
        first = job.rows[batch[0].index]
        pad = 0 if job.exact_length else self.info.loaded.pad_token_id
        main = np.full((len(batch), length, *first.shape[1:]), pad, dtype=first.dtype)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        type_rows = [r.pending.job.type_rows for r in batch]
        type_shape = next((t[0].shape[1:] for t in type_rows if t is not None), None)
        types = None if type_shape is None else np.zeros((len(batch), length, *type_shape), dtype=np.int64)
        for i, row in enumerate(batch):
            n = row.length
            main[i, :n] = row.pending.job.rows[row.index]
            mask[i, :n] = 1
            if types is not None and type_rows[i] is not None:
                types[i, :n] = type_rows[i][row.index]
        mask_tensor = torch.from_numpy(mask)
        inputs = {job.main_input: torch.from_numpy(main).to(device)}
        if any(r.pending.job.with_mask for r in batch):
            inputs["attention_mask"] = mask_tensor.to(device)
        if types is not None:
            inputs["token_type_ids"] = torch.from_numpy(types).to(device)
        return inputs, mask_tensor


def node_load() -> float | None:
    """The node's 1-minute load average (/proc/loadavg; ~20 µs); None where unknown. Several intra-op
    threads against busy processes wait on each other at every barrier: measured here under load
    average 7, a lone MiniLM pass on 2 threads cost 25x the one on 1 thread per token, so a lone pass
    keeps its worker's share on a loaded node (even to probe). The average, not the instantaneous count
    of runnable threads: that count includes the client and preproc_service finishing the very call the
    pass is for, and kept lone passes narrow on an idle node (quiet, concurrency 1: +6.45 ms added
    latency against +3.69 with this average; docs/model_service.md).
    The lone passes take this process's own recent CPU out of it (`RecentCpu`) and allow up to one core's
    worth of load above the cores for the rest of the stack's recent work (preproc_service, the client);
    StepThreads' measurement decides within that."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None


class RecentCpu:
    """This process's CPU use in cores, averaged as the kernel averages the load (exponentially, 1-minute
    time constant), so that it can be taken out of `node_load()`: on an idle node right after a saturated
    minute the load average is ~2 on 2 cores and mostly this process's own forward passes, which kept the
    lone passes narrow (quiet machine, concurrency 1: +3.69 ms added latency with the average alone, +2.88
    with no guard; docs/model_service.md). Each call to cores() folds in the CPU used since the last one at
    its mean rate over that interval."""

    def __init__(self, clock=time.monotonic, cpu=time.process_time, window: float = 60.0):
        self._clock, self._cpu, self.window = clock, cpu, window
        self._at, self._used = clock(), cpu()
        self._cores = 0.0

    def cores(self) -> float:
        now, used = self._clock(), self._cpu()
        elapsed = now - self._at
        if elapsed > 0:
            keep = math.exp(-elapsed / self.window)
            self._cores = keep * self._cores + (1 - keep) * (used - self._used) / elapsed
            self._at, self._used = now, used
        return self._cores


def _is_stale(pending: _Pending, now: float) -> bool:
    """The caller went away (its future is done/cancelled) or its deadline passed."""
    return pending.dropped or pending.future.done() or (pending.deadline is not None and now >= pending.deadline)


def pass_tokens_of(lengths: list[int], padding_free: bool) -> int:
    """Tokens a forward pass over rows of these lengths computes: rows x longest row when the engine pads
    them, their own tokens when it is padding-free (backends.py)."""
    return sum(lengths) if padding_free else len(lengths) * max(lengths)


def plan_groups(lengths: list[int], max_rows: int, token_budget: int, overhead_tokens: int,
                padding_free: bool = False) -> list[tuple[int, int]]:
    """Cut ascending `lengths` into contiguous groups [start, end) for separate forward passes.

    Minimises the tokens computed (rows x longest row per group; with a `padding_free` engine the rows'
    own tokens, so groups differ only by the per-pass term) plus `overhead_tokens` per forward pass (the
    fixed cost of one call, in token-equivalents), with at most `max_rows` rows and `token_budget` tokens
    per group. Dynamic programming, O(n x max_rows).
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    prefix = [0]
    for length in lengths:
        prefix.append(prefix[-1] + length)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):
            padded = prefix[end] - prefix[start] if padding_free else (end - start) * lengths[end - 1]
            if padded > token_budget and end - start > 1:
                continue
            cost = best[start] + padded + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


def _is_whole_request(batch: list[_Row], length: int) -> bool:
    """The batch is exactly one request's rows, in order, padded to the request's own length."""
    pending = batch[0].pending
    return (len(batch) == pending.job.batch and length == pending.job.padded_length
            and all(row.pending is pending and row.index == i for i, row in enumerate(batch)))


def assemble(job: InferJob, row_outputs: list[dict]) -> dict:
    """Stack a request's rows back to [B, L, ...] (zeros past each row's length) and shape its outputs."""
    lengths = [len(r) for r in job.rows]
    mask = torch.zeros((job.batch, job.padded_length), dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    stacked: dict = {}
    for source in {spec.source for spec in job.outputs}:
        first = row_outputs[0][source]
        if not job.exact_length and shaping.has_sequence_axis(source, first.ndim + 1, job.per_token):
            full = first.new_zeros((job.batch, job.padded_length, *first.shape[1:]))
            for i, row in enumerate(row_outputs):
                full[i, : lengths[i]] = row[source]
        else:
            full = torch.stack([row[source] for row in row_outputs])
        stacked[source] = full
    return _shape_all(job, stacked, mask)


def shape_outputs(job: InferJob, outputs: dict, mask: torch.Tensor) -> dict:
    """A whole request's outputs straight from its forward pass: zeros past each row's length, then shaped."""
    padded = not bool(mask.all())
    stacked: dict = {}
    for source in {spec.source for spec in job.outputs}:
        tensor = outputs[source]
        if padded and shaping.has_sequence_axis(source, tensor.ndim, job.per_token):
            tensor = tensor.masked_fill((mask == 0).view(*mask.shape, *[1] * (tensor.ndim - 2)), 0)
        stacked[source] = tensor
    return _shape_all(job, stacked, mask)


def _shape_all(job: InferJob, stacked: dict, mask: torch.Tensor) -> dict:
    result: dict = {}
    for spec in job.outputs:
        result.update(shaping.shape(spec, stacked[spec.source], mask, job.per_token))
    return result


def _trace_batch(batch: list[_Row], taken: float, forward_seconds: float, threads: int) -> None:
    """Each traced request's wait in the queue and the forward pass it was part of, as spans of its call."""
    forward_end = time.time_ns()
    forward_start = forward_end - int(forward_seconds * 1e9)
    for row in {id(r.pending): r for r in batch}.values():
        if row.pending.trace is not None:
            queued = forward_start - int(max(0.0, taken - row.arrived) * 1e9)
            tracing.record_span("queue", queued, forward_start, parent=row.pending.trace)
            tracing.record_span("forward", forward_start, forward_end, parent=row.pending.trace,
                                attributes={"splitserve.batch_rows": len(batch),
                                            "splitserve.torch_threads": threads})
