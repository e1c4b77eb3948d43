"""Fuzz tier (issue 12, "Show"): hypothesis over ModelInfer, ModelStreamInfer and the generation
API against real model_service processes. Every answer is OK or a documented client-error code
(never INTERNAL, UNKNOWN or a dropped connection), and afterwards the service still answers a
normal request exactly as the in-process model does.

CI runs FUZZ_EXAMPLES cases per surface (default 200); SPLITSERVE_FUZZ_EXAMPLES=5000 runs more.
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve_common.v2_codec import set_param
from splitserve_pb import generation_pb2, generation_pb2_grpc
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc
from tests import model_factory
from tests.fuzz_helpers import CLIENT_ERRORS
from tests.model_service_helpers import model_services, reference

FUZZ_EXAMPLES = int(os.environ.get("SPLITSERVE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_model")
    encoder, tokenizer = model_factory.build_encoder("token-classification", seed=3)
    gpt2, _ = model_factory.build_gpt2(seed=4)
    specs = {"encoder": (model_factory.save_components(root / "encoder", encoder, tokenizer, "token-classification"),
                         ["--max-message-mb", "4", "--model-name", "enc"]),
             "gpt2": (model_factory.save_components(root / "gpt2", gpt2, tokenizer, "text-generation"),
                      ["--model-name", "gpt"])}
    with model_services(specs, log_dir=root / "logs") as handles:
        channels = {key: grpc.insecure_channel(h.address) for key, h in handles.items()}
        yield {"handles": handles, "channels": channels, "encoder": encoder, "gpt2": gpt2,
               "vocab": encoder.config.vocab_size, "gpt2_vocab": gpt2.config.vocab_size,
               "positions": encoder.config.max_position_embeddings}
        for channel in channels.values():
            channel.close()


# ---------------------------------------------------------------- strategies

def sizes():
    """Dimensions: mostly small, sometimes 0, negative or far too large."""
    return st.one_of(st.integers(0, 6), st.integers(7, 80), st.sampled_from([-1, 2 ** 31, 2 ** 62, 2 ** 63 - 1]))


def param_values():
    return st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.sampled_from([0, 1, 3, 64, 10 ** 6]), st.booleans(),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                     st.sampled_from(["0", "0,1", "1,1,1", "-1", "999", "a,b", "mean", "cls", "max", "FP16", "FP32",
                                      "INT8", "alpha", "base", "0," * 200]))


def parameters():
    keys = st.sampled_from(["top_k", "gather_positions", "pooling", "normalize", "datatype", "adapter", "priority",
                            "binary_data_output", "unknown"])
    return st.dictionaries(st.one_of(keys, st.text(max_size=8)), param_values(), max_size=4)


@st.composite
def tensor_inputs(draw, vocab: int):
    """Input tensors: usually a valid-looking [B, L] id batch, then pushed off in one or two ways."""
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    ids = draw(st.lists(st.integers(-3, vocab + 3), min_size=rows * length, max_size=rows * length))
    tensors = [["input_ids", "INT64", [rows, length], np.asarray(ids, dtype="<i8").tobytes()]]
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, length), min_size=rows, max_size=rows))
        mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype("<i8")
        if draw(st.booleans()):
            mask = np.asarray(draw(st.lists(st.integers(-1, 2), min_size=mask.size, max_size=mask.size)),
                              dtype="<i8").reshape(mask.shape)
        tensors.append(["attention_mask", "INT64", [rows, length], mask.tobytes()])
    if draw(st.booleans()):
        tensors.append(["token_type_ids", "INT64", [rows, length],
                        np.asarray(draw(st.lists(st.integers(-1, 3), min_size=rows * length,
                                                 max_size=rows * length)), dtype="<i8").tobytes()])
    for tensor in tensors:  # perturb some fields
        if draw(st.integers(0, 4)) == 0:
            tensor[0] = draw(st.sampled_from(["input_ids", "attention_mask", "token_type_ids", "", "x"]))
        if draw(st.integers(0, 4)) == 0:
            tensor[1] = draw(st.sampled_from(["INT8", "INT32", "UINT64", "FP32", "BF16", "BOOL", "BYTES", "", "int"]))
        if draw(st.integers(0, 4)) == 0:
            tensor[2] = draw(st.lists(sizes(), max_size=4))
            if 0 in tensor[2]:
                tensor[3] = b""  # matches the shape's 0 elements: what follows is the shape's own check
        if draw(st.integers(0, 5)) == 0:
            tensor[3] = draw(st.binary(max_size=64))
    return tensors, draw(st.booleans())  # and whether to send typed contents instead of raw


def typed_values(raw: bytes):
    """Typed contents for a tensor: its ids, or values at and past the edges of the integer types."""
    ids = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<i8").tolist()
    edges = st.sampled_from([127, 128, -129, 255, 256, 32768, -40000, 2 ** 31 - 1, -2 ** 31, 2 ** 32 - 1])
    return st.one_of(st.just(ids), st.lists(edges, min_size=len(ids), max_size=len(ids)))


@st.composite
def infer_requests(draw, vocab: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["", "enc", "other"])), id=draw(st.text(max_size=8)))
    tensors, typed = draw(tensor_inputs(vocab))
    for name, datatype, shape, raw in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[max(-2 ** 63, min(d, 2 ** 63 - 1))
                                                                         for d in shape])
        if typed:
            values = draw(typed_values(raw))
            field = draw(st.sampled_from(["int64_contents", "int_contents", "uint_contents", "fp32_contents"]))
            try:
                getattr(tensor.contents, field).extend(values)
            except (ValueError, TypeError):  # out of the field's own range
                tensor.contents.int64_contents.extend(values)
        else:
            request.raw_input_contents.append(raw)
    names = ["logits", "last_hidden_state", "sentence_embedding", "pooler_output", "nope"]
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        out = request.outputs.add(name=name)
        for key, value in draw(parameters()).items():
            set_param(out.parameters, key, value)
    for key, value in draw(parameters()).items():
        set_param(request.parameters, key, value)
    return request


def optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def generate_requests(draw, vocab: int) -> generation_pb2.GenerateRequest:
    finite_or_not = st.one_of(st.floats(-2, 3), st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e308]))
    fields = {
        # Small budgets keep each case fast; the extremes are refused before any work.
        "max_new_tokens": st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 10 ** 6, 2 ** 31 - 1])),
        "min_new_tokens": optional(st.one_of(st.integers(0, 3), st.sampled_from([-5, 2 ** 31 - 1]))),
        "do_sample": optional(st.booleans()),
        "temperature": optional(finite_or_not),
        "top_k": optional(st.one_of(st.integers(0, 60), st.sampled_from([-1, 2 ** 31 - 1]))),
        "top_p": optional(finite_or_not),
        "repetition_penalty": optional(finite_or_not),
        "seed": optional(st.integers(0, 2 ** 64 - 1)),
    }
    values = {k: v for k, v in ((k, draw(s)) for k, s in fields.items()) if v is not None}
    settings_msg = generation_pb2.GenerationSettings(
        **values, ignore_eos=draw(st.booleans()), logprobs=draw(st.booleans()),
        stop_token_ids=draw(st.lists(st.integers(-5, vocab + 5), max_size=4)))
    prompt = draw(st.one_of(st.lists(st.integers(-2, vocab + 2), max_size=12),
                            st.lists(st.integers(0, vocab - 1), min_size=250, max_size=300)))
    return generation_pb2.GenerateRequest(model_name=draw(st.sampled_from(["", "gpt", "other"])),
                                          input_ids=prompt, settings=settings_msg,
                                          adapter=draw(st.sampled_from(["", "base", "nobody", "x" * 100])))


# ---------------------------------------------------------------- checks

def assert_client_error(exc: grpc.RpcError, request) -> None:
    assert exc.code() in CLIENT_ERRORS, f"{exc.code().name}: {exc.details()}\nrequest: {request}"
    assert exc.details(), f"{exc.code().name} without a message\nrequest: {request}"


def assert_still_answers_encoder(env) -> None:
    ids = np.asarray([[5, 17, 30, 9, 2]], dtype=np.int64)
    request = pb.ModelInferRequest()
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.tobytes())
    request.outputs.add(name="logits")
    reply = pb_grpc.GRPCInferenceServiceStub(env["channels"]["encoder"]).ModelInfer(request, timeout=TIMEOUT)
    got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(tuple(reply.outputs[0].shape))
    np.testing.assert_allclose(got, reference(env["encoder"], {"input_ids": ids})["logits"], atol=1e-5, rtol=1e-5)


def assert_still_generates(env) -> None:
    import torch

    prompt = [5, 17, 30]
    request = generation_pb2.GenerateRequest(input_ids=prompt, settings=generation_pb2.GenerationSettings(
        max_new_tokens=6, ignore_eos=True))
    tokens = [t for step in generation_pb2_grpc.GenerationStub(env["channels"]["gpt2"]).Generate(
        request, timeout=TIMEOUT) for t in step.token_ids]
    with torch.inference_mode():
        expected = env["gpt2"].generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                        pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == expected


# ---------------------------------------------------------------- the three surfaces

def test_model_infer_answers_ok_or_a_client_error(env):
    stub = pb_grpc.GRPCInferenceServiceStub(env["channels"]["encoder"])

    @FUZZ
    @given(infer_requests(env["vocab"]))
    def case(request):
        try:
            reply = stub.ModelInfer(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert_client_error(exc, request)
            return
        assert len(reply.outputs) == len(reply.raw_output_contents) >= 1

    case()
    assert_still_answers_encoder(env)


def test_model_stream_infer_answers_every_request_ok_or_a_client_error(env):
    stub = pb_grpc.GRPCInferenceServiceStub(env["channels"]["encoder"])

    @FUZZ
    @given(st.lists(infer_requests(env["vocab"]), min_size=1, max_size=4))
    def case(requests):
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT))
        assert len(answers) == len(requests)
        for answer in answers:
            if answer.error_message:
                code = answer.error_message.split(":", 1)[0]
                assert code in {c.name for c in CLIENT_ERRORS}, f"{answer.error_message}\nrequests: {requests}"

    case()
    assert_still_answers_encoder(env)


def test_generate_answers_ok_or_a_client_error(env):
    stub = generation_pb2_grpc.GenerationStub(env["channels"]["gpt2"])

    @FUZZ
    @given(generate_requests(env["gpt2_vocab"]))
    def case(request):
        try:
            steps = list(stub.Generate(request, timeout=TIMEOUT))
        except grpc.RpcError as exc:
            assert_client_error(exc, request)
            return
        assert steps and steps[-1].finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED

    case()
    assert_still_generates(env)


def test_undecodable_messages_are_invalid_argument(env):
    """Arbitrary bytes as the request message of every method."""
    v2 = "/inference.GRPCInferenceService/"
    methods = {"encoder": [v2 + "ModelInfer", v2 + "ModelMetadata", v2 + "ModelReady"],
               "gpt2": ["/splitserve.v1.Generation/Generate"]}

    @FUZZ
    @given(st.sampled_from([(k, m) for k, ms in methods.items() for m in ms]), st.binary(max_size=64))
    def case(target, payload):
        key, method = target
        channel = env["channels"][key]
        try:
            if method.endswith("Generate"):
                list(channel.unary_stream(method)(payload, timeout=TIMEOUT))
            else:
                channel.unary_unary(method)(payload, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert_client_error(exc, payload)

    case()
    assert_still_answers_encoder(env)
    assert_still_generates(env)
