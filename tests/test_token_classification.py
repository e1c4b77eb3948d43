"""preproc_service/tasks/token_classification.py without servers: entities for every aggregation
strategy equal the transformers pipeline's on the same in-process logits."""

from __future__ import annotations

import pytest

from preproc_service.tasks import token_classification as tok_cls
from splitserve_common.errors import InvalidArgument
from tests import model_factory as mf
from tests import preproc_helpers as h

TASK = "token-classification"


@pytest.fixture(scope="module")
def local():
    with h.local_task(TASK, seed=2) as local:
        yield local


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_entities_equal_pipeline(local, strategy):
    got, _ = local.run(mf.SENTENCES, {"aggregation_strategy": strategy.upper(), "ignore_labels": []})
    want = local.pipe(mf.SENTENCES, aggregation_strategy=strategy, ignore_labels=[])
    key = "entity" if strategy == "none" else "entity_group"
    fields = (key, "word", "start", "end", "index") if strategy == "none" else (key, "word", "start", "end")
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w) > 0
        for ge, we in zip(g, w, strict=True):
            assert tuple(ge[f] for f in fields) == tuple(we[f] for f in fields)
            assert ge["score"] == pytest.approx(float(we["score"]), abs=1e-5)


def test_ignored_labels_are_dropped_as_the_pipeline_does(local):
    got, params = local.run(mf.SENTENCES, {"aggregation_strategy": "simple"})
    want = local.pipe(mf.SENTENCES, aggregation_strategy="simple")
    assert [[(e["entity_group"], e["start"], e["end"]) for e in g] for g in got] == \
           [[(e["entity_group"], e["start"], e["end"]) for e in w] for w in want]
    assert params["ignore_labels"] == ["O"] and params["aggregation_strategy"] == "simple"


@pytest.mark.parametrize("entity, tag", [("B-PER", ("B", "PER")), ("I-LOC", ("I", "LOC")), ("MISC", ("I", "MISC"))])
def test_get_tag(entity, tag):
    assert tok_cls.TokenClassifier.get_tag(entity) == tag


def test_unknown_strategy_is_refused(local):
    with pytest.raises(InvalidArgument, match="aggregation_strategy must be one of"):
        tok_cls.sanitize_parameters(local.deployment, {"aggregation_strategy": "median", "ignore_labels": ["O"]})
