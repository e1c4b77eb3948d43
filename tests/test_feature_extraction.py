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
def local():
    with h.local_task(TASK, seed=5) as local:
        yield local


def test_token_vectors_equal_pipeline(local):
    (vectors, prompt_tokens), params = local.run(mf.SENTENCES, {})
    for text, vector in zip(mf.SENTENCES, vectors, strict=True):
        want = np.array(local.pipe(text))[0]
        assert vector.shape == want.shape and np.allclose(vector, want, atol=1e-5)
    assert prompt_tokens == sum(len(v) for v in vectors)
    assert (params["pooling"], params["normalize"]) == ("none", False)


def test_normalized_token_vectors_have_unit_length(local):
    (vectors, _), _ = local.run(mf.SENTENCES[:2], {"normalize": True})
    assert all(np.allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-5) for v in vectors)


def test_pooling_from_the_request_then_the_sentence_transformers_config(local):
    configured = h.local_deployment(TASK, local.model, local.tokenizer, pooling="cls", normalize=True)
    try:
        assert fe.sanitize_parameters(configured, {"pooling": None, "normalize": None}) == \
               {"pooling": "cls", "normalize": True}
        assert fe.sanitize_parameters(configured, {"pooling": "MAX", "normalize": False}) == \
               {"pooling": "max", "normalize": False}
        with pytest.raises(InvalidArgument, match="pooling must be one of"):
            fe.sanitize_parameters(configured, {"pooling": "median", "normalize": None})
    finally:
        configured.close()
