"""preproc_service/tasks/fill_mask.py without servers: candidates per mask (one or several masks,
with and without targets) equal the transformers pipeline's."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.tasks import fill_mask
from splitserve_common.errors import InvalidArgument
from tests import preproc_helpers as h

TASK = "fill-mask"
TEXTS = ["Alice walked to the [MASK] in Paris.", "the [MASK] market", "[MASK] is a [MASK] city"]


@pytest.fixture(scope="module")
def local():
    with h.local_task(TASK, seed=3) as local:
        yield local


def _run(local, texts, explicit):
    deployment = local.deployment

    def forward(model_inputs):  # what model_service's gather_positions returns: logits at the masks
        logits = []
        for enc, positions in zip(model_inputs["encodings"], model_inputs["masks"], strict=True):
            batch = deployment.pad([enc])
            logits.append(h.torch_forward(local.model, batch)["logits"][0, positions])
        return {"logits": logits}

    return local.run(texts, explicit, forward)


def _same(got_masks, want):
    want_masks = want if isinstance(want[0], list) else [want]
    assert len(got_masks) == len(want_masks)
    for g, w in zip(got_masks, want_masks, strict=True):
        assert [(c["token"], c["token_str"], c["sequence"]) for c in g] == \
               [(x["token"], x["token_str"], x["sequence"]) for x in w]
        assert np.allclose([c["score"] for c in g], [x["score"] for x in w], atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_candidates_equal_pipeline(local, top_k):
    options = {} if top_k is None else {"top_k": top_k}
    got, params = _run(local, TEXTS, options)
    for text, masks in zip(TEXTS, got, strict=True):
        _same(masks, local.pipe(text, **options))
    assert params["top_k"] == (top_k or 5)


def test_targets_equal_pipeline(local):
    targets = ["river", "market", "paris", "zzzzunknown"]
    got, _ = _run(local, TEXTS[:2], {"targets": targets, "top_k": 3})
    for text, masks in zip(TEXTS[:2], got, strict=True):
        _same(masks, local.pipe(text, targets=targets, top_k=3))


def test_refusals(local):
    with pytest.raises(InvalidArgument, match=r"no mask token \(\[MASK\]\)"):
        _run(local, ["no mask here"], {})
    with pytest.raises(InvalidArgument, match="top_k"):
        fill_mask.sanitize_parameters(local.deployment, {"top_k": 0})
    with pytest.raises(InvalidArgument, match="none of the targets"):
        fill_mask.sanitize_parameters(local.deployment, {"top_k": 5, "targets": ["", " "]})
