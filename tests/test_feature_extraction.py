"""preproc_service/tasks/feature_extraction.py without servers: token vectors equal the
transformers pipeline's; pooling and normalize follow the request, then the
sentence-transformers config."""

from __future__ import annotations

import numpy as np
import pytest

from preproc_service.tasks import feature_extraction as fe
from splitserve_common.errors import InvalidArgument
from tests import model_factory as mf
from tests import preproc_helpers as h

TASK = "feature-extraction"


@pytest.fixture(scope="module")
def built():
    model, tokenizer = mf.build_encoder(TASK, seed=5)
    deployment = h.local_deployment(TASK, model, tokenizer)
    yield model, tokenizer, h.pipeline(TASK, model, tokenizer), deployment
    deployment.close()


def test_token_vectors_equal_pipeline(built):
    model, _, pipe, deployment = built
    got, params = h.run_task(deployment, TASK, mf.SENTENCES, {},
                             lambda model_inputs: h.torch_forward(model, model_inputs["batch"]))
    vectors, prompt_tokens = got
    for text, vector in zip(mf.SENTENCES, vectors, strict=True):
        want = np.array(pipe(text))[0]
        assert vector.shape == want.shape and np.allclose(vector, want, atol=1e-5)
    assert prompt_tokens == sum(len(v) for v in vectors)
    assert (params["pooling"], params["normalize"]) == ("none", False)


def test_normalized_token_vectors_have_unit_length(built):
    model, _, _, deployment = built
    (vectors, _), _ = h.run_task(deployment, TASK, mf.SENTENCES[:2], {"normalize": True},
                                 lambda model_inputs: h.torch_forward(model, model_inputs["batch"]))
    assert all(np.allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-5) for v in vectors)


def test_pooling_from_the_request_then_the_sentence_transformers_config(built):
    model, tokenizer, _, _ = built
    configured = h.local_deployment(TASK, model, tokenizer, pooling="cls", normalize=True)
    try:
        assert fe.sanitize_parameters(configured, {"pooling": None, "normalize": None}) == \
               {"pooling": "cls", "normalize": True}
        assert fe.sanitize_parameters(configured, {"pooling": "MAX", "normalize": False}) == \
               {"pooling": "max", "normalize": False}
        with pytest.raises(InvalidArgument, match="pooling must be one of"):
            fe.sanitize_parameters(configured, {"pooling": "median", "normalize": None})
    finally:
        configured.close()
