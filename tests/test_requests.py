"""model_service/requests.py without a server: `parse` on a real tiny model's ServedModel turns v2
requests into unpadded rows and output specs, and refuses each bad request with a named reason."""

from __future__ import annotations

import numpy as np
import pytest

from model_service import loader, requests
from model_service.engine import Engine
from model_service.served_model import discover
from splitserve_common.errors import FailedPrecondition, InvalidArgument, NotFound
from splitserve_common.v2_codec import set_param
from splitserve_pb import open_inference_pb2 as pb
from tests import model_factory

MAX_BATCH = 4


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    """ServedModel of a tiny text-classification BERT (64 positions, type vocab 2), as the server builds it."""
    model, tokenizer = model_factory.build_encoder("text-classification", seed=3)
    directory = model_factory.save_components(tmp_path_factory.mktemp("requests") / "tc", model, tokenizer,
                                              "text-classification")
    engine = Engine(loader.load(loader.LoadOptions(model_dir=str(directory), device="cpu")), torch_threads=1)
    yield discover(engine, "tc", MAX_BATCH)
    engine.close()


def request(inputs: dict, outputs=(), parameters=None, raw=True, **fields) -> pb.ModelInferRequest:
    """A v2 request written field by field: INT64 unless an input is given as (DATATYPE, array)."""
    message = pb.ModelInferRequest(**fields)
    for name, value in inputs.items():
        datatype, array = value if isinstance(value, tuple) else ("INT64", np.asarray(value, dtype=np.int64))
        tensor = message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            message.raw_input_contents.append(array.tobytes())
        else:
            tensor.contents.int64_contents.extend(array.ravel().tolist())
    for name in outputs:
        message.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        set_param(message.parameters, key, value)
    return message


def test_padded_rows_come_back_unpadded_with_the_padded_length(info):
    ids = [[2, 10, 11, 12, 3], [2, 20, 3, 0, 0]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    types = [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    job = requests.parse(request({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, id="r1"),
                         info)
    assert job.request_id == "r1" and job.batch == 2 and job.padded_length == 5
    assert [r.tolist() for r in job.rows] == [[2, 10, 11, 12, 3], [2, 20, 3]]
    assert [r.tolist() for r in job.type_rows] == [[0, 0, 0, 1, 1], [0, 1, 1]]
    assert all(r.dtype == np.int64 for r in job.rows)


def test_without_a_mask_every_position_is_a_token_and_typed_contents_work(info):
    job = requests.parse(request({"input_ids": [[2, 5, 6, 3]]}, raw=False), info)
    assert [r.tolist() for r in job.rows] == [[2, 5, 6, 3]] and job.type_rows is None


def test_narrow_integer_ids_are_widened(info):
    job = requests.parse(request({"input_ids": ("INT32", np.array([[2, 7, 3]], dtype=np.int32))}), info)
    assert job.rows[0].dtype == np.int64 and job.rows[0].tolist() == [2, 7, 3]


def test_default_outputs_and_named_outputs_with_parameters(info):
    default = requests.parse(request({"input_ids": [[2, 5, 3]]}), info)
    assert [s.name for s in default.outputs] == info.default_outputs == ["logits"]
    job = requests.parse(request({"input_ids": [[2, 5, 3]]}, ["sentence_embedding", "logits"],
                                 {"top_k": 2, "pooling": "cls", "datatype": "FP16", "adapter": ""}), info)
    embedding, logits = job.outputs
    assert (embedding.name, embedding.pooling, embedding.source) == ("sentence_embedding", "cls", "last_hidden_state")
    assert (logits.top_k, logits.datatype) == (2, "FP16") and job.adapter == ""


def test_adapter_parameter_is_carried(info):
    assert requests.parse(request({"input_ids": [[2, 5, 3]]}, parameters={"adapter": "alpha"}), info).adapter \
        == "alpha"


REFUSED = {
    "raw count": (lambda: _extra_raw(request({"input_ids": [[2, 3]]})), InvalidArgument, "raw_input_contents"),
    "unknown input": (lambda: request({"input_ids": [[2, 3]], "pixel_values": [[1, 1]]}), InvalidArgument,
                      "unknown input 'pixel_values'"),
    "twice": (lambda: _twice(request({"input_ids": [[2, 3]]})), InvalidArgument, "given twice"),
    "unknown datatype": (lambda: request({"input_ids": ("INT128", np.array([[2, 3]]))}), InvalidArgument,
                         "INT128"),
    "float ids": (lambda: request({"input_ids": ("FP32", np.array([[2, 3]], dtype=np.float32))}), InvalidArgument,
                  "integer tensor"),
    "rank": (lambda: request({"input_ids": np.array([2, 3, 4])}), InvalidArgument, "rank 2"),
    "no ids": (lambda: request({"attention_mask": [[1, 1]]}), InvalidArgument, "'input_ids' is required"),
    "shapes differ": (lambda: request({"input_ids": [[2, 3, 4]], "attention_mask": [[1, 1]]}), InvalidArgument,
                      "input_ids has [1, 3]"),
    "empty": (lambda: request({"input_ids": np.zeros((1, 0), dtype=np.int64)}), InvalidArgument, "is empty"),
    "batch": (lambda: request({"input_ids": np.full((MAX_BATCH + 1, 3), 5)}), InvalidArgument,
              "over the limit of 4 (--max-batch-size)"),
    "left padded": (lambda: request({"input_ids": [[5, 5, 5]], "attention_mask": [[0, 1, 1]]}), InvalidArgument,
                    "right-padded"),
    "mask values": (lambda: request({"input_ids": [[5, 5, 5]], "attention_mask": [[1, 2, 0]]}), InvalidArgument,
                    "only 0 and 1"),
    "empty row": (lambda: request({"input_ids": [[5, 5], [5, 5]], "attention_mask": [[1, 1], [0, 0]]}),
                  InvalidArgument, "row(s) [1] have no tokens"),
    "too long": (lambda: request({"input_ids": np.full((1, 65), 5)}), InvalidArgument,
                 "longer than the model's 64 positions"),
    "vocab": (lambda: request({"input_ids": [[2, 100000]]}), InvalidArgument, "outside the vocabulary"),
    "negative id": (lambda: request({"input_ids": [[2, -1]]}), InvalidArgument, "outside the vocabulary"),
    "type ids": (lambda: request({"input_ids": [[2, 3]], "token_type_ids": [[0, 2]]}), InvalidArgument,
                 "token_type_ids must be in [0, 2)"),
    "unknown output": (lambda: request({"input_ids": [[2, 3]]}, ["logitz"]), InvalidArgument,
                       "unknown output 'logitz'"),
    "unknown parameter": (lambda: request({"input_ids": [[2, 3]]}, parameters={"temprature": 1.0}),
                          InvalidArgument, "'temprature'"),
    "adapter type": (lambda: request({"input_ids": [[2, 3]]}, parameters={"adapter": 3}), InvalidArgument,
                     "'adapter' must be str"),
    "model name": (lambda: request({"input_ids": [[2, 3]]}, model_name="gpt-9"), NotFound, "'gpt-9' is not served"),
    "version": (lambda: request({"input_ids": [[2, 3]]}, model_version="7"), NotFound, "no version '7'"),
}


def _extra_raw(message):
    message.raw_input_contents.append(b"\x00" * 8)
    return message


def _twice(message):
    message.inputs.append(message.inputs[0])
    message.raw_input_contents.append(message.raw_input_contents[0])
    return message


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_requests_are_refused_naming_what_is_wrong(info, case):
    build, error, words = REFUSED[case]
    with pytest.raises(error) as excinfo:
        requests.parse(build(), info)
    assert words in str(excinfo.value)


def test_a_model_without_infer_outputs_points_to_generation(info):
    import dataclasses

    bare = dataclasses.replace(info, outputs={})
    with pytest.raises(FailedPrecondition, match="use the Generation service"):
        requests.parse(request({"input_ids": [[2, 3]]}), bare)


def test_row_lengths_accepts_only_right_padded_masks():
    assert requests.row_lengths(None, (2, 3)).tolist() == [3, 3]
    assert requests.row_lengths(np.array([[1, 1, 0], [1, 0, 0]]), (2, 3)).tolist() == [2, 1]
    with pytest.raises(InvalidArgument, match="right-padded"):
        requests.row_lengths(np.array([[1, 0, 1]]), (1, 3))
