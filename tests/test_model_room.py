"""preproc_service/model_room.py: a large request takes room in model_service's queue before it is
tokenized; it waits (first come, first served, bounded) while the room is taken, small ones never wait."""

from __future__ import annotations

import asyncio

import pytest

from preproc_service.model_room import ModelRoom
from splitserve_common.errors import ConfigurationError, DeadlineExceeded, ResourceExhausted

CAPACITY, ONE_REQUEST = 8, 2  # model_service's --max-queue-rows and --max-batch-size


async def settle() -> None:
    """Let every task that can run do so (all in this loop: no thread, no timer involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


def held_in(room: ModelRoom, rows: int, log: list, name: str, release: asyncio.Event, timeout=None):
    """A request of `rows` that records when it got its room, and holds it until `release` is set."""
    async def request():
        async with room.rows(rows, CAPACITY, ONE_REQUEST, timeout):
            log.append(name)
            await release.wait()
    return asyncio.ensure_future(request())


def test_a_large_request_waits_while_others_take_the_room_and_goes_in_arrival_order():
    async def scenario():
        room, log = ModelRoom(max_waiting=4), []
        first_done, later_done = asyncio.Event(), asyncio.Event()
        first = held_in(room, 5, log, "first", first_done)
        await settle()
        second = held_in(room, 6, log, "second", later_done)  # 5 + 6 > 8: waits
        third = held_in(room, 3, log, "third", later_done)  # 5 + 3 would fit, but it came after the second
        small = held_in(room, ONE_REQUEST, log, "small", later_done)  # one model request: never waits
        await settle()
        assert log == ["first", "small"] and room.waiting == 2 and room.held == 5
        first_done.set()
        await first
        await settle()
        assert log == ["first", "small", "second"] and room.waiting == 1  # 6 + 3 > 8: the third still waits
        later_done.set()
        await asyncio.gather(second, third, small)
        return log, room

    log, room = asyncio.run(scenario())
    assert log == ["first", "small", "second", "third"]
    assert room.held == 0 and room.waiting == 0


def test_past_the_waiting_bound_a_large_request_is_refused_at_once_naming_the_flag():
    async def scenario():
        room, log, release = ModelRoom(max_waiting=1), [], asyncio.Event()
        first = held_in(room, 6, log, "first", release)
        await settle()
        second = held_in(room, 6, log, "second", release)
        await settle()
        with pytest.raises(ResourceExhausted) as refused:
            async with room.rows(6, CAPACITY, ONE_REQUEST, None):
                log.append("third")
        release.set()
        await asyncio.gather(first, second)
        return log, str(refused.value), room

    log, message, room = asyncio.run(scenario())
    assert log == ["first", "second"]
    assert "--max-waiting-large-requests" in message and "--max-queue-rows" in message and "6 rows" in message
    assert room.held == 0


def test_with_no_waiting_allowed_a_large_request_that_does_not_fit_is_refused_at_once():
    async def scenario():
        room, log, release = ModelRoom(max_waiting=0), [], asyncio.Event()
        first = held_in(room, 6, log, "first", release)
        await settle()
        with pytest.raises(ResourceExhausted):
            async with room.rows(4, CAPACITY, ONE_REQUEST, None):
                log.append("refused one")
        async with room.rows(2, CAPACITY, ONE_REQUEST, None):  # fits beside the first: no wait
            log.append("fitting one")
        release.set()
        await first
        return log

    assert asyncio.run(scenario()) == ["first", "fitting one"]


def test_a_wait_past_the_deadline_is_deadline_exceeded_and_gives_its_place_up():
    async def scenario():
        room, log, release = ModelRoom(max_waiting=4), [], asyncio.Event()
        first = held_in(room, 6, log, "first", release)
        await settle()
        with pytest.raises(DeadlineExceeded) as late:
            async with room.rows(6, CAPACITY, ONE_REQUEST, 0.05):
                log.append("late")
        waiting_after = room.waiting
        release.set()
        await first
        return log, str(late.value), waiting_after, room

    log, message, waiting_after, room = asyncio.run(scenario())
    assert log == ["first"] and "model_service's queue" in message
    assert waiting_after == 0 and room.held == 0


def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_gets_in():
    async def scenario():
        room, log = ModelRoom(max_waiting=4), []
        first_done, rest_done = asyncio.Event(), asyncio.Event()
        first = held_in(room, 6, log, "first", first_done)
        await settle()
        gone = held_in(room, 6, log, "gone", rest_done)
        after = held_in(room, 6, log, "after", rest_done)
        await settle()
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert room.waiting == 1
        first_done.set()
        await first
        await settle()
        rest_done.set()
        await after
        return log, room

    log, room = asyncio.run(scenario())
    assert log == ["first", "after"] and room.held == 0 and room.waiting == 0


def test_requests_over_the_whole_queue_or_without_a_known_queue_pass_through():
    """Over the whole queue: Deployment refuses them (INVALID_ARGUMENT), they must not wait for room that
    never comes; before the handshake (capacity 0) nothing is known to wait for."""
    async def scenario():
        room, log, release = ModelRoom(max_waiting=0), [], asyncio.Event()
        first = held_in(room, 6, log, "first", release)
        await settle()
        async with room.rows(CAPACITY + 1, CAPACITY, ONE_REQUEST, None):
            log.append("over the queue")
        async with room.rows(6, 0, 0, None):
            log.append("no handshake yet")
        release.set()
        await first
        return log

    assert asyncio.run(scenario()) == ["first", "over the queue", "no handshake yet"]


def test_a_negative_bound_is_refused_by_name():
    with pytest.raises(ConfigurationError, match="--max-waiting-large-requests"):
        ModelRoom(max_waiting=-1)
