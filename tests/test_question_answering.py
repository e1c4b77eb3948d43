"""preproc_service/tasks/question_answering.py without servers: answers over one or many doc_stride
windows equal a brute-force search by the transformers 4.x pipeline's rules (transformers 5 has
no question-answering pipeline)."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.tasks import question_answering as qa
from splitserve_common.errors import InvalidArgument
from tests import preproc_helpers as h

TASK = "question-answering"
SHORT = [("who lives in paris?", "Alice lives in Paris with Bob and Carol."),
         ("what is long?", "the river is long and the forest is old")]
LONG_CONTEXT = " ".join(
    ["the gentle worker builds a modern system in Tokyo every summer morning, and Alice reads history"] * 12)


@pytest.fixture(scope="module")
def local():
    with h.local_task(TASK, seed=6, with_pipeline=False) as local:
        yield local


def _same(got, want):
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"]) for a in want]
    assert np.allclose([a["score"] for a in got], [a["score"] for a in want], atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 3])
def test_short_contexts(local, top_k):
    got, params = local.run(SHORT, {"top_k": top_k})
    for (question, context), answers in zip(SHORT, got, strict=True):
        _same(answers, h.qa_reference(local.model, local.tokenizer, question, context, top_k=top_k))
        assert all(a["answer"] == context[a["start"]:a["end"]] for a in answers)
    assert (params["max_seq_len"], params["doc_stride"]) == (64, 32)  # min(64, 384), min(64 // 2, 128)


def test_long_context_over_doc_stride_windows(local):
    question = "who reads history?"
    windows = local.tokenizer(question, LONG_CONTEXT, truncation="only_second", max_length=64, stride=20,
                       return_overflowing_tokens=True)["input_ids"]
    assert len(windows) > 3
    got, _ = local.run([(question, LONG_CONTEXT)], {"top_k": 2, "doc_stride": 20, "max_answer_len": 5})
    _same(got[0], h.qa_reference(local.model, local.tokenizer, question, LONG_CONTEXT, top_k=2, stride=20,
                                 max_answer_len=5))


def test_handle_impossible_answer(local):
    question, context = SHORT[0]
    got, _ = local.run([SHORT[0]], {"top_k": 3, "handle_impossible_answer": True})
    _same(got[0], h.qa_reference(local.model, local.tokenizer, question, context, top_k=3, impossible=True))


def test_decode_spans_keeps_the_best_allowed_spans():
    start = np.array([0.1, 0.5, 0.2, 0.2])
    end = np.array([0.1, 0.1, 0.6, 0.2])
    allowed = np.array([0, 1, 1, 1])  # token 0 (CLS) is never part of an answer
    starts, ends, scores = qa.decode_spans(start, end, 2, max_answer_len=2, undesired_tokens=allowed)
    assert list(zip(starts.tolist(), ends.tolist(), strict=True)) == [(1, 2), (2, 2)]
    assert np.allclose(scores, [0.5 * 0.6, 0.2 * 0.6])


@pytest.mark.parametrize("inputs, params, fragment", [
    ([("who?", "")], {}, "context is missing"),
    ([("", "Alice lives in Paris")], {}, "question is missing"),
    ([], {}, "empty"),
    ([("who?", "Alice")], {"top_k": 0}, "top_k"),
    ([("who?", "Alice")], {"max_answer_len": 0}, "max_answer_len"),
    ([("who?", "Alice")], {"doc_stride": 100, "max_seq_len": 50}, "doc_stride"),
])
def test_bad_input_is_refused(local, inputs, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        local.run(inputs, params)
