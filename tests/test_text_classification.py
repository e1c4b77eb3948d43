"""preproc_service/tasks/text_classification.py without servers: the model runs in process,
the answers equal the transformers pipeline's."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.tasks import text_classification as tc
from splitserve_common.errors import InvalidArgument
from tests import model_factory as mf
from tests import preproc_helpers as h

TASK = "text-classification"


@pytest.fixture(scope="module")
def local():
    with h.local_task(TASK, seed=1) as local:
        yield local


def _same(got, want):
    for g, w in zip(got, want, strict=True):
        assert [x["label"] for x in g] == [x["label"] for x in w]
        assert np.allclose([x["score"] for x in g], [x["score"] for x in w], atol=1e-5)


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
def test_scores_equal_pipeline(local, function):
    got, params = local.run(mf.SENTENCES, {"top_k": 3, "function_to_apply": function})
    _same(got, local.pipe(mf.SENTENCES, top_k=3, function_to_apply=function))
    assert params["function_to_apply"] == function


def test_default_is_the_best_label_with_the_models_function(local):
    got, params = local.run(mf.SENTENCES, {})
    want = local.pipe(mf.SENTENCES)
    _same(got, [[w] for w in want])
    assert params["function_to_apply"] == "softmax"  # three labels, no problem_type


def test_text_pairs_equal_pipeline(local):
    texts, pairs = ["who lives in paris", "the river"], ["Alice lives in Paris.", "is long"]
    got, _ = local.run(tc.pair_inputs(texts, pairs), {"top_k": 2})
    _same(got, local.pipe([{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)], top_k=2))
    with pytest.raises(InvalidArgument, match="text_pairs has 1 entries but texts has 2"):
        tc.pair_inputs(texts, pairs[:1])


@pytest.mark.parametrize("problem_type, num_labels, function", [
    ("regression", 1, "none"), ("multi_label_classification", 3, "sigmoid"), (None, 1, "sigmoid"),
    ("single_label_classification", 1, "sigmoid"), ("single_label_classification", 3, "softmax"),
    (None, 3, "softmax"), (None, 0, "none")])
def test_default_function_follows_the_pipeline(problem_type, num_labels, function):
    assert tc.default_function(problem_type, num_labels) == function


@pytest.mark.parametrize("params, fragment", [
    ({"top_k": 0}, "top_k"), ({"top_k": -1}, "top_k"), ({"function_to_apply": "tanh"}, "function_to_apply")])
def test_bad_parameters_are_refused(local, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        tc.sanitize_parameters(local.deployment, {"function_to_apply": None, "top_k": None, **params})


def test_empty_input_is_refused(local):
    with pytest.raises(InvalidArgument, match="empty"):
        local.run([], {})
