"""splitserve_common.v2_codec on its own: no server, no model."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from splitserve_common import v2_codec
from splitserve_common.errors import InvalidArgument
from splitserve_common.v2_codec import ModelMetadata, TensorSpec
from splitserve_pb import open_inference_pb2 as pb

EVERY_NUMPY_DATATYPE = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
                        "FP16", "FP32", "FP64"]


def _sample(datatype: str) -> np.ndarray:
    dtype = v2_codec.NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    return np.array([[info.min, 0, 1], [info.max, 2, 3]], dtype=dtype)


@pytest.mark.parametrize("datatype", EVERY_NUMPY_DATATYPE)
def test_request_round_trip_keeps_every_datatype_and_value(datatype):
    array = _sample(datatype)
    request = v2_codec.encode_request({"x": array}, ["y"], {"top_k": 3, "pooling": "cls", "normalize": True,
                                                           "scale": 0.5, "unset": None},
                                      {"y": {"top_k": 1}}, model_name="m", request_id="r1")
    assert request.inputs[0].datatype == datatype and list(request.inputs[0].shape) == [2, 3]
    assert len(request.raw_input_contents[0]) == array.size * array.dtype.itemsize
    decoded = v2_codec.decode_request_inputs(request)["x"]
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    assert v2_codec.params_to_dict(request.parameters) == {"top_k": 3, "pooling": "cls", "normalize": True,
                                                          "scale": 0.5}
    assert v2_codec.params_to_dict(request.outputs[0].parameters) == {"top_k": 1}
    assert (request.model_name, request.id) == ("m", "r1")


def test_raw_bytes_are_little_endian_row_major():
    array = np.array([[1, 256]], dtype=">i4")  # big-endian in memory: must still go little-endian
    _, _, raw = v2_codec.to_raw(array)
    assert raw == struct.pack("<2i", 1, 256)


def test_typed_contents_decode_like_raw():
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    tensor.contents.int64_contents.extend([5, 6, 7])
    assert v2_codec.decode_request_inputs(request)["input_ids"].tolist() == [[5, 6, 7]]


def test_bf16_response_widens_to_exact_float32():
    values = np.array([1.0, -2.5, 3.140625, 1e-3], dtype=np.float32)  # bf16 keeps the top 16 bits
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    response = pb.ModelInferResponse()
    response.outputs.add(name="logits", datatype="BF16", shape=[4])
    response.raw_output_contents.append(bits.tobytes())
    widened = v2_codec.decode_response(response)["logits"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, (bits.astype(np.uint32) << 16).view(np.float32))
    assert abs(widened[2] - 3.140625) < 1e-6
    assert v2_codec.decode_response(response, widen_bf16=False)["logits"].dtype == np.uint16


def test_bytes_tensor_round_trip_with_length_prefixes():
    array = np.array([["a", "héllo"], ["", "x" * 300]])
    datatype, shape, raw = v2_codec.to_raw(array)
    assert datatype == "BYTES" and shape == [2, 2]
    assert raw[:5] == struct.pack("<I", 1) + b"a"
    decoded = v2_codec.decode_tensor("t", datatype, shape, raw)
    assert decoded.shape == (2, 2)
    assert decoded.tolist() == [[b"a", "héllo".encode()], [b"", b"x" * 300]]
    contents = pb.InferTensorContents(bytes_contents=[b"p", b"q"])
    assert v2_codec.decode_tensor("t", "BYTES", [2], contents=contents).tolist() == [b"p", b"q"]


@pytest.mark.parametrize("raw, fragment", [
    (struct.pack("<I", 5) + b"abc", "says 5 bytes"),
    (struct.pack("<I", 1) + b"a" + b"\x01", "truncated length prefix"),
    (struct.pack("<I", 1) + b"a", "1 BYTES elements do not match the shape (2)"),
])
def test_malformed_bytes_are_invalid_argument(raw, fragment):
    with pytest.raises(InvalidArgument, match="tensor 't'") as exc:
        v2_codec.decode_tensor("t", "BYTES", [2], raw)
    assert fragment in exc.value.message


def test_response_round_trip_with_parameters():
    outputs = {"logits": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([[4], [2]])}
    response = v2_codec.encode_response(outputs, model_name="m", model_version="1", request_id="r",
                                        parameters={"batch_size": 7})
    result = v2_codec.decode_response(response)
    assert set(result) == {"logits", "ids"}
    np.testing.assert_array_equal(result["logits"], outputs["logits"])
    assert result["ids"].dtype == np.int64
    assert result.parameters == {"batch_size": 7} and result.id == "r" and result.model_name == "m"


@pytest.mark.parametrize("build, fragment", [
    (lambda r: r.inputs.add(name="x", datatype="INT33", shape=[1]), "unknown datatype 'INT33'"),
    (lambda r: r.inputs.add(name="x", datatype="INT64", shape=[-1]), "negative dimension"),
    (lambda r: (r.inputs.add(name="x", datatype="INT64", shape=[2]), r.raw_input_contents.append(b"\0" * 8)),
     "8 bytes do not match shape [2]"),
    (lambda r: (r.inputs.add(name="x", datatype="INT64", shape=[1]), r.inputs.add(name="y", datatype="INT64",
                                                                                  shape=[1]),
                r.raw_input_contents.append(b"\0" * 8)), "1 raw_input_contents for 2 inputs"),
    (lambda r: (r.inputs.add(name="x", datatype="INT64", shape=[1]), r.raw_input_contents.append(b"\0" * 8),
                r.inputs.add(name="x", datatype="INT64", shape=[1]), r.raw_input_contents.append(b"\0" * 8)),
     "given twice"),
    (lambda r: r.inputs.add(name="x", datatype="FP16", shape=[1]), "must be sent as raw contents"),
    (lambda r: r.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(2147483647),
     "out of range for INT8"),
    (lambda r: (r.inputs.add(name="x", datatype="INT64", shape=[0, 2 ** 40, 2 ** 40]),
                r.raw_input_contents.append(b"")), "not usable"),
])
def test_bad_requests_are_invalid_argument_naming_the_tensor(build, fragment):
    request = pb.ModelInferRequest()
    build(request)
    with pytest.raises(InvalidArgument) as exc:
        v2_codec.decode_request_inputs(request)
    assert fragment in exc.value.message


def test_typed_parameter_checks():
    assert v2_codec.typed({"k": 3}, "k", float) == 3.0
    assert v2_codec.typed({}, "k", int, 9) == 9
    with pytest.raises(InvalidArgument, match="'k' must be int, got bool"):
        v2_codec.typed({"k": True}, "k", int)


def test_preproc_tensor_keeps_fp16_and_sends_other_floats_as_fp32():
    half = np.array([[0.5, -1.0]], dtype=np.float16)
    tensor = v2_codec.to_preproc_tensor(half)
    assert tensor.datatype == "FP16" and list(tensor.shape) == [1, 2]
    np.testing.assert_array_equal(v2_codec.from_preproc_tensor(tensor), half)
    double = np.array([1.25, 2.5])
    tensor = v2_codec.to_preproc_tensor(double)
    assert tensor.datatype == "FP32" and len(tensor.data) == 8
    assert v2_codec.from_preproc_tensor(tensor).tolist() == [1.25, 2.5]


def test_metadata_round_trip_and_wire_keys():
    meta = ModelMetadata(
        name="m", versions=["1"], platform="pytorch_transformers",
        inputs=[TensorSpec("input_ids", "INT64", [-1, -1])], outputs=[TensorSpec("logits", "FP32", [-1, 3])],
        task="text-classification", id2label={0: "neg", 1: "pos"}, num_labels=2, max_position_embeddings=512,
        vocab_size=30522, pad_token_id=0, bos_token_id=None, eos_token_ids=[2, 3], decoder_start_token_id=None,
        is_encoder_decoder=False, pooling={"mode": "mean", "normalize": True}, adapters=["a"],
        default_adapter="a", max_batch_size=32, default_outputs=["start_logits", "end_logits"])
    response = meta.to_response()
    wire = v2_codec.params_to_dict(response.parameters)
    # The keys and encodings docs/contracts.md promises to v2 clients that read the map directly.
    assert wire["id2label"] == '{"0": "neg", "1": "pos"}'
    assert wire["eos_token_id"] == "[2, 3]" and "eos_token_ids" not in wire
    assert wire["bos_token_id"] == -1 and wire["decoder_start_token_id"] == -1 and wire["pad_token_id"] == 0
    assert wire["pooling"] == '{"mode": "mean", "normalize": true}' and wire["adapters"] == '["a"]'
    assert wire["default_outputs"] == "start_logits,end_logits"
    assert wire["max_batch_size"] == 32 and wire["is_encoder_decoder"] is False
    decoded = ModelMetadata.from_response(response)
    assert decoded == meta
    assert decoded.labels == ["neg", "pos"]


def test_metadata_from_an_older_server_uses_defaults():
    response = pb.ModelMetadataResponse(name="old")
    v2_codec.set_param(response.parameters, "task", "fill-mask")
    v2_codec.set_param(response.parameters, "some_future_key", "ignored")
    meta = ModelMetadata.from_response(response)
    assert (meta.name, meta.task, meta.default_outputs, meta.eos_token_ids, meta.pad_token_id) == \
        ("old", "fill-mask", [], [], None)
