"""preproc_service parts without servers: model directory reading, micro-batched tokenization,
the handshake rules."""

from __future__ import annotations

import asyncio
import threading

import pytest

from preproc_service.handshake import disagreements
from preproc_service.model_dir import read_model_dir
from preproc_service.tokenization import EncodeOptions, Tokenization, pad_batch
from splitserve_common.errors import FailedPrecondition, InvalidArgument
from splitserve_common.v2_codec import ModelMetadata
from tests import model_factory
from tests import preproc_helpers as h


@pytest.fixture(scope="module")
def tokenizer():
    return model_factory.wordpiece_tokenizer(model_max_length=64)


def test_read_components_and_sentence_transformers_dirs(tmp_path):
    directory, _, _ = h.build_task_model(tmp_path, "token-classification", model_config={"aggregation_strategy": "max"},
                                         signature_params=[{"name": "ignore_labels", "default": []}])
    md = read_model_dir(directory)
    assert md.task == "token-classification" and md.tokenizer_path == directory / "components" / "tokenizer"
    assert md.model_config == {"aggregation_strategy": "max"} and md.signature_params == {"ignore_labels": []}
    minilm = read_model_dir(model_factory.minilm_dir())
    assert (minilm.task, minilm.pooling, minilm.normalize, minilm.max_seq_length) == \
           ("feature-extraction", "mean", True, 256)
    with pytest.raises(FailedPrecondition):
        read_model_dir(tmp_path / "missing")


def test_concurrent_requests_share_tokenizer_batches(tokenizer):
    texts = [f"{a} walked to {b}" for a in model_factory.NAMES for b in model_factory.PLACES] * 3

    class Counting(Tokenization):
        calls = 0

        def _encode_parts(self, lane, parts):
            Counting.calls += 1
            return super()._encode_parts(lane, parts)

    async def run():
        tok = Counting(tokenizer, max_length=64)
        results = await asyncio.gather(*(tok.encode([t], EncodeOptions(max_length=64)) for t in texts))
        tok.close()
        return results

    results = asyncio.run(run())
    assert Counting.calls < len(texts) / 4  # 72 requests, a handful of batch calls
    for text, groups in zip(texts, results, strict=True):
        assert groups[0][0].ids == tokenizer(text)["input_ids"]


def test_a_lone_small_request_is_tokenized_on_the_event_loop_and_a_burst_on_the_thread(tokenizer):
    """Concurrency 1 saves the two thread hand-offs (issue 13); requests that come together, or while others
    are in progress, still share the tokenizer thread's rounds, and a large request never runs on the event loop."""
    texts = [f"{a} walked to {b}" for a in model_factory.NAMES for b in model_factory.PLACES]
    large = " ".join(texts)
    gap = 0.2  # seconds: calls this far apart come alone; a gather's calls start within far less

    class Where(Tokenization):
        def _encode_parts(self, lane, parts):
            ran.append((threading.current_thread() is threading.main_thread(), len(parts)))
            return super()._encode_parts(lane, parts)

    ran: list[tuple[bool, int]] = []
    model_calls = [0]
    options = EncodeOptions(max_length=64)

    async def run():
        tok = Where(tokenizer, max_length=64, inline_chars=len(texts[0]) * 2, lone_gap=gap,
                    crowded=lambda: model_calls[0] > 0)
        try:
            spaced = []
            for text in texts[:4]:
                await asyncio.sleep(gap * 1.25)
                spaced.append(await tok.encode([text], options))
            lone = list(ran)
            ran.clear()
            model_calls[0] = 1  # others' model calls in flight (concurrency 32: arrivals can be 5 ms apart too)
            for text in texts[:2]:
                await asyncio.sleep(gap * 1.25)
                await tok.encode([text], options)
            crowded = list(ran)
            ran.clear()
            model_calls[0] = 0
            bursts = []
            for start in (4, 12):  # concurrent callers: each burst follows a pause, as passes answer together
                await asyncio.sleep(gap * 1.25)
                bursts.append(await asyncio.gather(*(tok.encode([t], options) for t in texts[start:start + 8])))
                burst = list(ran)
                ran.clear()
            together = bursts[0] + bursts[1]
            await asyncio.sleep(gap * 1.25)
            await tok.encode([large], options)
            return spaced + together, lone, crowded, burst
        finally:
            tok.close()

    results, lone, crowded, burst = asyncio.run(run())
    for text, groups in zip(texts, results, strict=False):
        assert groups[0][0].ids == tokenizer(text, truncation=True, max_length=64)["input_ids"]
    # The first call follows no gap it knows of; from the third on, each came alone: on the event loop.
    assert lone[2:] == [(True, 1), (True, 1)], lone
    assert crowded == [(False, 1), (False, 1)], crowded  # spaced apart, but with other requests in progress
    # A burst after others goes to the thread, in shared rounds, even its first call (which followed a pause).
    assert all(not on_loop for on_loop, _ in burst) and len(burst) < 8, burst
    assert ran == [(False, 1)]  # the large request, alone but over inline_chars


def test_truncation_and_padding(tokenizer):
    long_text = " ".join(["river"] * 100)

    async def run():
        tok = Tokenization(tokenizer, max_length=64)
        try:
            cut = await tok.encode_truncating([long_text, "a b"], truncation=True)
            with pytest.raises(InvalidArgument, match="102 tokens long, more than the model's limit of 64"):
                await tok.encode_truncating(["short", long_text], truncation=False)
            return cut
        finally:
            tok.close()

    cut = asyncio.run(run())
    assert len(cut[0].ids) == 64 and cut[0].ids == tokenizer(long_text, truncation=True)["input_ids"]
    batch = pad_batch(cut, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 64) and batch["attention_mask"][1].sum() == len(cut[1].ids)
    assert (batch["input_ids"][1, len(cut[1].ids):] == tokenizer.pad_token_id).all()


def test_handshake_rules(tokenizer):
    good = ModelMetadata(task="text-classification", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert disagreements(tokenizer, "text-classification", good) == []
    assert disagreements(tokenizer, "zero-shot-classification", good) == []  # an NLI model is a classifier
    small = ModelMetadata(task="fill-mask", vocab_size=len(tokenizer) - 10, pad_token_id=tokenizer.pad_token_id + 1)
    problems = " | ".join(disagreements(tokenizer, "text-classification", small))
    assert "embedding has only" in problems and "pad_token_id differs" in problems and "task differs" in problems
