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
def local():
    with h.local_task(TASK, seed=4) as local:
        yield local


@pytest.mark.parametrize("multi_label", [False, True])
def test_scores_equal_pipeline(local, multi_label):
    got, params = local.run(mf.SENTENCES, {"candidate_labels": LABELS, "multi_label": multi_label})
    for text, g in zip(mf.SENTENCES, got, strict=True):
        w = local.pipe(text, candidate_labels=LABELS, multi_label=multi_label)
        assert g["sequence"] == w["sequence"] and g["labels"] == w["labels"]
        assert np.allclose(g["scores"], w["scores"], atol=1e-5)
    assert params["candidate_labels"] == LABELS


def test_comma_separated_labels_template_and_single_label(local):
    template = "The topic is {}."
    got, params = local.run(mf.SENTENCES[:1], {"candidate_labels": " music ,", "hypothesis_template": template})
    w = local.pipe(mf.SENTENCES[0], candidate_labels=["music"], hypothesis_template=template)
    assert got[0]["labels"] == w["labels"] == ["music"] and np.allclose(got[0]["scores"], w["scores"], atol=1e-5)
    assert params["candidate_labels"] == ["music"]


def test_entailment_label_is_found_by_name():
    assert zs.entailment_id({0: "contradiction", 1: "neutral", 2: "ENTAILMENT"}) == 2
    assert zs.entailment_id({0: "LABEL_0", 1: "LABEL_1"}) == -1


@pytest.mark.parametrize("params, fragment", [
    ({"candidate_labels": []}, "candidate_labels is empty"),
    ({"candidate_labels": " , "}, "candidate_labels is empty"),
    ({"candidate_labels": ["a"], "hypothesis_template": "no placeholder"}, "does not place the label")])
def test_bad_parameters_are_refused(local, params, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        zs.sanitize_parameters(local.deployment, {"hypothesis_template": "This example is {}.", "multi_label": False,
                                          **params})
