"""Generation lanes (issue 13 item 6): the running rows split into one decode batch per forward
worker, the lanes stepping at once; one FIFO queue and one set of limits for all of them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from model_service.generation.scheduler import LANE_MIN_ROWS

# Seconds a test waits for a sequence's next token: the scheduler may be slow under load, never silent.
EVENT_SECONDS = 120
OVERLAP_SECONDS = 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Two forward workers of one torch thread each: two lanes."""
    from model_service.engine import Engine
    from model_service.loader import LoadOptions, load
    from tests.generation_helpers import save_generative

    eng = Engine(load(LoadOptions(model_dir=str(save_generative(tmp_path_factory.mktemp("gen") / "gpt2")))),
                 torch_threads=1, forward_workers=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tokenizer():
    from tests.model_factory import bytelevel_bpe_tokenizer

    return bytelevel_bpe_tokenizer()


def make_seq(engine, ids, new_tokens: int):
    from model_service.generation.batch import Sequence
    from model_service.generation.sampling import model_defaults, resolve
    from splitserve_pb import generation_pb2 as gpb

    params = resolve(gpb.GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                     model_defaults({}, {}), prompt_len=len(ids), context_len=256, eos_token_ids=[])
    return Sequence("s", list(ids), params)


def scheduler_of(engine, **kwargs):
    from model_service.generation.batch import GenerationModel
    from model_service.generation.scheduler import Scheduler

    loaded = engine.loaded
    return Scheduler(engine, GenerationModel(loaded.model, loaded.pad_token_id, None), **{"lanes": 0, **kwargs})


async def next_event(seq):
    event = await asyncio.wait_for(seq.events.get(), EVENT_SECONDS)  # fails, not hangs, if none comes
    if isinstance(event, Exception):
        raise event
    return event


async def drain(seq) -> list[int]:
    tokens = []
    while True:
        event = await next_event(seq)
        tokens.append(event.token)
        if event.finish_reason:
            return tokens


class StepWatch:
    """Wraps each lane's step (the real one runs): which rows each lane stepped, and the most steps in flight."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.rows = [set() for _ in scheduler._lanes]
        self.in_flight = self.most_in_flight = 0
        self.most_active = 0
        self.lock = threading.Lock()
        # Each lane's first step is held until another step is in flight (at most OVERLAP_SECONDS), so that
        # steps run at once however the threads happen to be scheduled; serialized steps never overlap.
        self.overlap = threading.Event()
        self.held = set()
        for index, lane in enumerate(scheduler._lanes):
            lane.core.step = self.watched(index, lane.core.step)

    def watched(self, index, step):
        def run(admitted, dropped, alone):
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                self.most_active = max(self.most_active, self.scheduler.active_count)
                if self.in_flight >= 2:
                    self.overlap.set()
                hold = index not in self.held
                self.held.add(index)
            if hold:
                self.overlap.wait(OVERLAP_SECONDS)
            try:
                results = step(admitted, dropped, alone)
                self.rows[index].update(id(seq) for seq, _ in results)
                return results
            finally:
                with self.lock:
                    self.in_flight -= 1
        return run

    def lane(self, seq) -> int:
        """The lane that stepped `seq` (a row stays in its lane)."""
        (index,) = [i for i, rows in enumerate(self.rows) if id(seq) in rows]
        return index


def test_flag_values_and_lane_counts(engine):
    from splitserve_common.errors import ConfigurationError

    assert len(scheduler_of(engine)._lanes) == 2  # 0: one per forward worker
    assert len(scheduler_of(engine, lanes=1)._lanes) == 1
    assert len(scheduler_of(engine, lanes=5)._lanes) == 2  # at most the forward workers
    with pytest.raises(ConfigurationError, match="--gen-lanes"):
        scheduler_of(engine, lanes=-1)


def test_rows_split_over_both_lanes_step_at_once_and_equal_generate(engine, tokenizer):
    from tests.generation_helpers import reference_generate

    texts = ["a", "the river", "Alice walks to the market", "why " * 12, "東京 🙂 " * 4, "Bob said that",
             "in the morning", "the old market by the river", "she", "a friend of Alice"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    new_tokens = 24

    async def scenario():
        scheduler = scheduler_of(engine)
        watch = StepWatch(scheduler)
        seqs = [scheduler.submit(make_seq(engine, ids, new_tokens)) for ids in prompts]
        results = [await drain(seq) for seq in seqs]
        await scheduler.stop()
        return seqs, results, watch, scheduler.stats()

    seqs, results, watch, stats = asyncio.run(scenario())
    assert len(seqs) >= LANE_MIN_ROWS
    assert [len(rows) for rows in watch.rows] == [5, 5]  # an even split, each row in one lane only
    assert not watch.rows[0] & watch.rows[1]
    assert watch.most_in_flight == 2  # the two lanes' steps ran at the same time
    assert stats["generated_tokens"] == len(seqs) * new_tokens and stats["active_sequences"] == 0
    for tokens, ids in zip(results, prompts, strict=True):
        assert tokens == reference_generate(engine.loaded.model, tokenizer, ids, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False)


def test_few_rows_stay_in_one_lane(engine):
    async def scenario():
        scheduler = scheduler_of(engine)
        watch = StepWatch(scheduler)
        seqs = [scheduler.submit(make_seq(engine, [5, 6, 7 + i], 6)) for i in range(LANE_MIN_ROWS - 1)]
        for seq in seqs:
            await drain(seq)
        await scheduler.stop()
        return watch

    watch = asyncio.run(scenario())
    assert sorted(len(rows) for rows in watch.rows) == [0, LANE_MIN_ROWS - 1]


def test_limits_hold_across_lanes_and_admission_stays_first_come_first_served(engine):
    from model_service.generation.scheduler import Limits

    async def scenario():
        # 10 rows at once, and 10 x 20 positions of 12-token reservations (8 + 4 new): the sequence limit binds.
        scheduler = scheduler_of(engine, limits=Limits(max_sequences=10, max_tokens=200, max_waiting=64))
        watch = StepWatch(scheduler)
        order = []
        admit = scheduler._admit

        def recorded(lane):
            admitted = admit(lane)
            order.extend(admitted)
            return admitted

        scheduler._admit = recorded
        seqs = [scheduler.submit(make_seq(engine, list(range(5, 13)), 4 + i % 5)) for i in range(30)]
        for seq in seqs:
            await drain(seq)
        await scheduler.stop()
        return seqs, order, watch

    seqs, order, watch = asyncio.run(scenario())
    assert order == seqs  # no request overtook an earlier one, whichever lane took it
    assert watch.most_active <= 10
    assert all(watch.rows) and watch.most_in_flight == 2


def test_a_cancelled_or_finished_row_frees_its_slot_in_its_own_lane(engine):
    from model_service.generation.scheduler import Limits

    async def scenario():
        scheduler = scheduler_of(engine, limits=Limits(max_sequences=LANE_MIN_ROWS, max_tokens=65536))
        watch = StepWatch(scheduler)
        # LANE_MIN_ROWS rows fill both lanes; the shortest finishes first; two more wait for a slot.
        lengths = [200] * LANE_MIN_ROWS
        lengths[1] = 5
        running = [scheduler.submit(make_seq(engine, [5, 6, 7, 8 + i], n)) for i, n in enumerate(lengths)]
        waiting = [scheduler.submit(make_seq(engine, [9, 10, 11], 200)) for _ in range(2)]
        for seq in running:
            await next_event(seq)
        lanes = [watch.lane(seq) for seq in running]
        assert sorted(lanes) == [0] * (LANE_MIN_ROWS // 2) + [1] * (LANE_MIN_ROWS // 2)
        await next_event(waiting[0])  # it got the finished row's slot
        after_finish = watch.lane(waiting[0])
        victim = next(seq for seq, lane in zip(running, lanes, strict=True) if lane != after_finish)
        scheduler.cancel(victim)
        await next_event(waiting[1])  # it got the cancelled row's slot
        after_cancel = watch.lane(waiting[1])
        counts = [len(lane.active) for lane in scheduler._lanes]
        await scheduler.stop()
        return lanes[1], after_finish, lanes[running.index(victim)], after_cancel, counts

    finished_lane, after_finish, cancelled_lane, after_cancel, counts = asyncio.run(scenario())
    assert after_finish == finished_lane and after_cancel == cancelled_lane != finished_lane
    assert counts == [LANE_MIN_ROWS // 2] * 2


def test_a_failing_lane_fails_only_its_own_rows(engine, tokenizer):
    from splitserve_common.errors import Unavailable
    from tests.generation_helpers import reference_generate

    prompts = [[5, 6, 7 + i] for i in range(LANE_MIN_ROWS)]

    async def scenario():
        scheduler = scheduler_of(engine)
        lane = scheduler._lanes[1]
        step, calls, stepped = lane.core.step, [], set()

        def failing(admitted, dropped, alone):  # lane 1's third step fails (after two real ones)
            calls.append(len(calls))
            if len(calls) == 3:
                raise RuntimeError("lane 1 broke")
            results = step(admitted, dropped, alone)
            stepped.update(id(seq) for seq, _ in results)
            return results

        lane.core.step = failing
        seqs = [scheduler.submit(make_seq(engine, ids, 12)) for ids in prompts]
        outcomes = await asyncio.gather(*(drain(seq) for seq in seqs), return_exceptions=True)
        lanes = [1 if id(seq) in stepped else 0 for seq in seqs]
        later = scheduler.submit(make_seq(engine, prompts[0], 12))  # both lanes serve again
        again = await drain(later)
        await scheduler.stop()
        return lanes, outcomes, again, scheduler.stats()

    lanes, outcomes, again, stats = asyncio.run(scenario())
    assert lanes.count(1) == LANE_MIN_ROWS // 2
    for ids, lane, outcome in zip(prompts, lanes, outcomes, strict=True):
        if lane == 1:
            assert isinstance(outcome, Unavailable) and "lane 1 broke" in str(outcome)
        else:
            assert outcome == reference_generate(engine.loaded.model, tokenizer, ids, max_new_tokens=12,
                                                 min_new_tokens=12, do_sample=False)
    assert again == reference_generate(engine.loaded.model, tokenizer, prompts[0], max_new_tokens=12,
                                       min_new_tokens=12, do_sample=False)
    assert stats["active_sequences"] == 0
