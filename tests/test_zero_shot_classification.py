"""preproc_service/tasks/zero_shot_classification.py without servers: label scores (single and
multi-label, custom templates) equal the transformers pipeline's."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.tasks import zero_shot_classification as zs
from splitserve_common.errors import InvalidArgument
from tests import model_factory as mf
from tests import preproc_helpers as h

TASK = "zero-shot-classification"
LABELS = ["travel", "music", "science", "history"]


@pytest.fixture(scope="module")
def built():
    model, tokenizer = mf.build_encoder(TASK, seed=4)
    deployment = h.local_deployment(TASK, model, tokenizer)
    yield model, h.pipeline(TASK, model, tokenizer), deployment
    deployment.close()


def _run(built, texts, explicit):
    model, _, deployment = built
    return h.run_task(deployment, TASK, texts, explicit, lambda model_inputs: h.torch_forward(model,
                                                                                               model_inputs["batch"]))


@pytest.mark.parametrize("multi_label", [False, True])
def test_scores_equal_pipeline(built, multi_label):
    got, params = _run(built, mf.SENTENCES, {"candidate_labels": LABELS, "multi_label": multi_label})
    for text, g in zip(mf.SENTENCES, got, strict=True):
        w = built[1](text, candidate_labels=LABELS, multi_label=multi_label)
        assert g["sequence"] == w["sequence"] and g["labels"] == w["labels"]
        assert np.allclose(g["scores"], w["scores"], atol=1e-5)
    assert params["candidate_labels"] == LABELS


def test_comma_separated_labels_template_and_single_label(built):
    template = "The topic is {}."
    got, params = _run(built, mf.SENTENCES[:1], {"candidate_labels": " music ,", "hypothesis_template": template})
    w = built[1](mf.SENTENCES[0], candidate_labels=["music"], hypothesis_template=template)
    assert got[0]["labels"] == w["labels"] == ["music"] and np.allclose(got[0]["scores"], w["scores"], atol=1e-5)
    assert params["candidate_labels"] == ["music"]


def test_entailment_label_is_found_by_name():
    assert zs.entailment_id({0: "contradiction", 1: "neutral", 2: "ENTAILMENT"}) == 2
    assert zs.entailment_id({0: "LABEL_0", 1: "LABEL_1"}) == -1


@pytest.mark.parametrize("params, fragment", [
    ({"candidate_labels": []}, "candidate_labels is empty"),
    ({"candidate_labels": " , "}, "candidate_labels is empty"),
    ({"candidate_labels": ["a"], "hypothesis_template": "no placeholder"}, "does not place the label")])
def test_bad_parameters_are_refused(built, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        zs.sanitize_parameters(built[2], {"hypothesis_template": "This example is {}.", "multi_label": False,
                                          **params})
