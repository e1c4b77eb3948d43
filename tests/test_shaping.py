"""model_service/shaping.py without a server: which outputs a request's parameters ask for, and what
pooling, gathering, top-k and the datatype cast do to a tensor (against numpy written out here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_service import shaping
from model_service.shaping import OutputSpec
from splitserve_common.errors import InvalidArgument
from splitserve_common.v2_codec import set_param
from splitserve_pb import open_inference_pb2 as pb

AVAILABLE = ["logits", "last_hidden_state", "start_logits", "sentence_embedding"]
POOLING = {"mode": "mean", "normalize": False}


def infer_request(parameters=None, outputs=None) -> pb.ModelInferRequest:
    """`outputs`: {name: {parameter: value}}."""
    message = pb.ModelInferRequest()
    for key, value in (parameters or {}).items():
        set_param(message.parameters, key, value)
    for name, params in (outputs or {}).items():
        out = message.outputs.add(name=name)
        for key, value in params.items():
            set_param(out.parameters, key, value)
    return message


def specs(parameters=None, outputs=None, length=6):
    return shaping.parse_specs(infer_request(parameters, outputs), AVAILABLE, ["logits"], POOLING, length)


def test_no_outputs_named_means_the_defaults_with_the_model_pooling():
    assert specs() == [OutputSpec("logits", pooling="mean", normalize=False)]
    pooled = shaping.parse_specs(infer_request(outputs={"sentence_embedding": {}}), AVAILABLE, ["logits"],
                                 {"mode": "cls", "normalize": True}, 4)
    assert pooled == [OutputSpec("sentence_embedding", pooling="cls", normalize=True)]


def test_per_output_parameters_override_the_request_level_ones():
    got = specs({"top_k": 3, "datatype": "FP16", "gather_positions": "0, 2"},
                {"logits": {}, "start_logits": {"top_k": 0, "datatype": "FP32"}, "sentence_embedding":
                 {"pooling": "max", "normalize": True}})
    assert got == [
        OutputSpec("logits", top_k=3, gather_positions=(0, 2), datatype="FP16"),
        OutputSpec("start_logits", top_k=0, gather_positions=(0, 2), datatype="FP32"),
        OutputSpec("sentence_embedding", top_k=3, gather_positions=(0, 2), pooling="max", normalize=True,
                   datatype="FP16"),
    ]


def test_stock_v2_client_keys_are_accepted_and_ignored():
    assert specs({"binary_data_output": True, "priority": 1}, {"logits": {"binary_data": True}}) == specs()


REFUSED = {
    "unknown request key": ({"temprature": 1.0}, None, "unknown parameter(s) 'temprature' in request parameters"),
    "adapter per output": (None, {"logits": {"adapter": "a"}}, "'adapter' in output 'logits' parameters"),
    "unknown output": (None, {"logitz": {}}, "unknown output 'logitz'; this model has logits"),
    "negative top_k": ({"top_k": -1}, None, "'top_k' must be >= 0"),
    "top_k type": ({"top_k": "three"}, None, "'top_k' must be int"),
    "top_k bool": ({"top_k": True}, None, "'top_k' must be int"),
    "gather not ints": ({"gather_positions": "1,x"}, None, "comma-separated ints"),
    "gather past the end": ({"gather_positions": "0,6"}, None, "gather_positions [6] outside the input length 6"),
    "gather negative": ({"gather_positions": "-1"}, None, "[-1] outside"),
    "pooling": ({"pooling": "sum"}, None, "'pooling' must be one of mean, cls, max"),
    "datatype": ({"datatype": "BF16"}, None, "FP32 or FP16"),
    "normalize type": ({"normalize": "yes"}, None, "'normalize' must be bool"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_parameters_are_refused_by_name(case):
    parameters, outputs, words = REFUSED[case]
    with pytest.raises(InvalidArgument) as excinfo:
        specs(parameters, outputs)
    assert words in str(excinfo.value)


HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [9.0, 9.0]],
                       [[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("mode, want", [
    ("mean", [[2.0, -1.0], [0.5, 0.5]]),  # padding (the 9s) left out
    ("cls", [[1.0, 2.0], [0.5, 0.5]]),
    ("max", [[3.0, 2.0], [0.5, 0.5]]),
])
def test_pooling_uses_only_the_rows_tokens(mode, want):
    got = shaping.pool(HIDDEN, MASK, mode, normalize=False)
    assert np.allclose(got.numpy(), want)
    normalized = shaping.pool(HIDDEN, MASK, mode, normalize=True).numpy()
    assert np.allclose(normalized, np.array(want) / np.linalg.norm(want, axis=1, keepdims=True))


def test_sentence_embedding_is_pooled_from_last_hidden_state():
    spec = OutputSpec("sentence_embedding", pooling="mean", normalize=False)
    assert spec.source == "last_hidden_state"
    out = shaping.shape(spec, HIDDEN, MASK)
    assert list(out) == ["sentence_embedding"] and out["sentence_embedding"].dtype == np.float32
    assert np.allclose(out["sentence_embedding"], [[2.0, -1.0], [0.5, 0.5]])


def test_top_k_returns_values_and_indices_and_keeps_k_within_the_axis():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.0, 0.5]])
    out = shaping.shape(OutputSpec("logits", top_k=2), logits, MASK)
    assert sorted(out) == ["logits_topk_indices", "logits_topk_values"]
    assert out["logits_topk_indices"].tolist() == [[1, 2], [0, 2]] and out["logits_topk_indices"].dtype == np.int64
    assert np.allclose(out["logits_topk_values"], [[0.7, 0.2], [0.9, 0.5]])
    everything = shaping.shape(OutputSpec("logits", top_k=10), logits, MASK)
    assert everything["logits_topk_indices"].shape == (2, 3)


def test_gather_positions_applies_to_sequence_outputs_only():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    gathered = shaping.shape(OutputSpec("last_hidden_state", gather_positions=(2, 0)), hidden, MASK)
    assert np.array_equal(gathered["last_hidden_state"], hidden[:, [2, 0]].numpy())
    start = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [B, L]: a sequence output though 2-D
    assert shaping.shape(OutputSpec("start_logits", gather_positions=(1,)), start, MASK)["start_logits"].tolist() \
        == [[2.0], [5.0]]
    logits = torch.tensor([[1.0, 2.0, 3.0]])  # [B, labels]: no sequence axis, left whole
    assert shaping.shape(OutputSpec("logits", gather_positions=(1,)), logits, MASK)["logits"].tolist() \
        == [[1.0, 2.0, 3.0]]


def test_fp16_cast_applies_to_floats_and_not_to_indices():
    values = torch.tensor([[0.1, 0.3, 0.2]], dtype=torch.float64)
    assert shaping.shape(OutputSpec("logits", datatype="FP16"), values, MASK)["logits"].dtype == np.float16
    assert shaping.shape(OutputSpec("logits"), values, MASK)["logits"].dtype == np.float32
    top = shaping.shape(OutputSpec("logits", top_k=1, datatype="FP16"), values, MASK)
    assert top["logits_topk_values"].dtype == np.float16 and top["logits_topk_indices"].dtype == np.int64


def test_has_sequence_axis():
    assert shaping.has_sequence_axis("start_logits", 2) and shaping.has_sequence_axis("last_hidden_state", 3)
    assert not shaping.has_sequence_axis("logits", 2)
