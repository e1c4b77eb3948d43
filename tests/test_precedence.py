"""preproc_service/precedence.py: MLflow's precedence, for encoder tasks and generation alike
(per-request > signature param defaults > saved model_config > the pipeline's defaults)."""

from __future__ import annotations

import pytest

from preproc_service.generation.request_params import GenerationParams
from preproc_service.precedence import Precedence, explicit_fields
from splitserve_common import tasks
from splitserve_common.errors import InvalidArgument
from splitserve_pb import preproc_pb2 as pb


def test_request_over_signature_over_model_config_over_pipeline():
    defaults = tasks.TASKS["text-classification"].pipeline_defaults
    precedence = Precedence(model_config={"top_k": 2, "function_to_apply": "none", "unrelated": 1},
                            signature_params={"function_to_apply": "sigmoid"})
    assert precedence.resolve(defaults).values == {"function_to_apply": "sigmoid", "top_k": 2, "truncation": True}
    resolved = precedence.resolve(defaults, {"top_k": 3})
    assert resolved.values == {"function_to_apply": "sigmoid", "top_k": 3, "truncation": True}
    assert resolved.set_values() == {"function_to_apply": "sigmoid", "top_k": 3}
    assert Precedence().resolve(tasks.TASKS["fill-mask"].pipeline_defaults).values["top_k"] == 5


def test_defaults_are_copied_per_request():
    values = Precedence().resolve(tasks.TASKS["token-classification"].pipeline_defaults).values
    values["ignore_labels"].append("B-PER")
    assert tasks.TASKS["token-classification"].pipeline_defaults["ignore_labels"] == ["O"]


def test_generation_same_order_max_tokens_counts_as_max_new_tokens():
    precedence = Precedence(model_config={"max_tokens": 30, "temperature": 0.5, "stop": "END"},
                            signature_params={"max_new_tokens": 20, "collapse_whitespace": True})
    params = GenerationParams(precedence, "text-generation", {"temperature": 0.9})
    assert params.settings.max_new_tokens == 20 and params.settings.temperature == pytest.approx(0.9)
    assert not params.settings.HasField("top_k")  # nobody set it: model_service decides
    assert params.applied == {"max_new_tokens": 20, "temperature": 0.9, "collapse_whitespace": True, "stop": "END"}
    assert params["stop"] == ["END"] and params["return_full_text"] is True
    only_config = GenerationParams(Precedence(model_config={"max_tokens": 30}), "summarization", {})
    assert only_config.settings.max_new_tokens == 30 and only_config.applied == {"max_new_tokens": 30}


def test_generation_value_of_the_wrong_type_is_refused():
    with pytest.raises(InvalidArgument, match="'top_k' has a value of the wrong type"):
        GenerationParams(Precedence(model_config={"top_k": "many"}), "text-generation", {})


def test_explicit_fields_sees_optional_presence_and_non_empty_repeated():
    request = pb.FillMaskRequest(texts=["a [MASK]"], top_k=0)
    assert explicit_fields(request, ["top_k", "truncation", "targets"]) == {"top_k": 0}
    request.targets.append("river")
    assert explicit_fields(request, ["targets"]) == {"targets": ["river"]}
