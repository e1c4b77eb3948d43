"""Bulk work at a lower CPU priority (issue 12, isolation under a flood): preproc tokenizes requests of
more than one round on a niced thread of its own, small ones on the normal thread; model_service runs
long requests' passes on niced forward workers. Real servers on loopback, then the tokenizer lanes in
process with the bulk lane held busy (no timing: a small request must finish while it is held)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from client.preproc_client import PreprocClient
from preproc_service.tokenization import EncodeOptions, Tokenization
from splitserve_common.errors import ConfigurationError
from splitserve_common.priority import thread_nice
from tests import model_factory
from tests import preproc_helpers as h

BULK_NICE = 7
SENTENCE = " ".join(["river forest music summer"] * 10)  # 40 words: 42 tokens of the tiny model
LARGE = [SENTENCE] * 100  # 22,500 characters: more than one --tokenize-round-chars round (16,384)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return h.build_task_model(tmp_path_factory.mktemp("bulk"), "text-classification")[0]


def niced_threads(pid: int) -> int:
    """How many of the process's threads have BULK_NICE more than its main thread."""
    base = thread_nice(pid)
    return sum(thread_nice(int(tid)) == base + BULK_NICE for tid in os.listdir(f"/proc/{pid}/task"))


# Long requests are pinned (no measured cost in the choice): with --max-pass-ms 0 a pass holds
# --token-budget tokens, so a request of 32 rows x 42 tokens (a preproc slice) is over 8 passes of 64.
MODEL_ARGS = ("--forward-workers", "2", "--max-pass-ms", "0", "--lone-pass-ms", "0", "--token-budget", "64")


@pytest.mark.server
def test_large_requests_run_on_niced_threads_and_small_ones_do_not(model_dir):
    with h.stack(model_dir, "--tokenize-bulk-nice", str(BULK_NICE),
                 model_args=(*MODEL_ARGS, "--forward-bulk-nice", str(BULK_NICE))) as (model, preproc), \
            PreprocClient(preproc.address, timeout=120) as client:
        for _ in range(3):
            assert len(client.classify(["a small one"])) == 1
            assert len(client.tokenize([SENTENCE] * 4)) == 4
        assert niced_threads(preproc.proc.pid) == 0  # small requests: the normal tokenizer thread
        assert niced_threads(model.proc.pid) == 0    # one-row and short requests: the normal forward workers

        assert len(client.tokenize(LARGE)) == len(LARGE)
        assert niced_threads(preproc.proc.pid) == 1
        assert len(client.classify([SENTENCE] * 64)) == 64
        assert niced_threads(model.proc.pid) >= 1
        assert len(client.classify(["still answered"])) == 1


@pytest.mark.server
def test_bulk_nice_zero_keeps_every_thread_at_the_process_priority(model_dir):
    with h.stack(model_dir, "--tokenize-bulk-nice", "0",
                 model_args=(*MODEL_ARGS, "--forward-bulk-nice", "0")) as (model, preproc), \
            PreprocClient(preproc.address, timeout=120) as client:
        assert len(client.tokenize(LARGE)) == len(LARGE)
        assert len(client.classify([SENTENCE] * 64)) == 64
        assert niced_threads(preproc.proc.pid) == 0
        assert niced_threads(model.proc.pid) == 0


def test_a_small_request_is_tokenized_while_the_bulk_lane_is_busy():
    """The bulk lane's thread is held by a blocker; a small request must still be answered (with one
    thread for all, it would wait behind the blocker and the wait below would fail)."""
    _, tokenizer = model_factory.build_encoder("text-classification")
    tokenization = Tokenization(tokenizer, 64, round_chars=1000, bulk_nice=BULK_NICE)
    release = threading.Event()

    async def scenario():
        loop = asyncio.get_running_loop()
        held = loop.run_in_executor(tokenization._bulk_lane.executor, release.wait, 60)
        large = asyncio.ensure_future(tokenization.encode([SENTENCE] * 10, EncodeOptions()))  # 2,250 characters
        small = await asyncio.wait_for(tokenization.encode(["a small one"], EncodeOptions()), 30)
        assert not large.done()  # still behind the blocker on the bulk lane
        release.set()
        await held
        assert len(await asyncio.wait_for(large, 30)) == 10
        return small

    try:
        small = asyncio.run(scenario())
    finally:
        release.set()
        tokenization.close()
    assert small[0][0].tokens[0] == "[CLS]"


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_nice_value_that_cannot_be_set_is_refused_by_name(nice):
    _, tokenizer = model_factory.build_encoder("text-classification")
    with pytest.raises(ConfigurationError, match="--tokenize-bulk-nice must be 0-19"):
        Tokenization(tokenizer, 64, bulk_nice=nice)
