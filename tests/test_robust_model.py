"""model_service under careless or hostile callers (issue 12, items 1, 5 and 6), real servers on
loopback: every size a request chooses is bounded before any compute, bad input is
INVALID_ARGUMENT (never INTERNAL or UNKNOWN), and health tells the truth about generation."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve_common.v2_codec import set_param
from splitserve_pb import generation_pb2, generation_pb2_grpc
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc
from tests import model_factory
from tests.model_service_helpers import SERVING, model_services
from tests.ops_helpers import sample, scrape, tiny_model
from tests.servers import free_port

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MESSAGE_MB = 1  # a small message limit, so an answer over it is cheap to ask for


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust_model")
    model, tokenizer = model_factory.build_encoder("fill-mask", seed=1)
    fill_mask = model_factory.save_components(root / "fill-mask", model, tokenizer, "fill-mask")
    metrics_port = free_port()
    specs = {"fill-mask": (fill_mask, ["--max-message-mb", str(MESSAGE_MB), "--metrics-port", str(metrics_port)]),
             "gpt2": (tiny_model("gpt2"), [])}
    with model_services(specs, log_dir=root / "logs") as handles:
        yield {"handles": handles, "vocab": model.config.vocab_size, "hidden": model.config.hidden_size,
               "positions": model.config.max_position_embeddings, "metrics_port": metrics_port}


def infer_stub(env, key="fill-mask"):
    channel = grpc.insecure_channel(env["handles"][key].address,
                                    options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)])
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def request_of(ids: np.ndarray, outputs=(), **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.astype("<i8").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in params.items():
        set_param(request.parameters, key, value)
    return request


def ids_of(rows: int, length: int) -> np.ndarray:
    return (np.arange(rows * length, dtype=np.int64).reshape(rows, length) % 50) + 5


def call_error(call, request, timeout=30.0) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=timeout)
    return caught.value


def forward_passes(env) -> float:
    return sample(scrape(env["metrics_port"]), "splitserve_batch_size_count")


def assert_still_serves(env):
    channel, stub = infer_stub(env)
    with channel:
        reply = stub.ModelInfer(request_of(ids_of(2, 6), ["logits"]), timeout=30)
    assert list(reply.outputs[0].shape) == [2, 6, env["vocab"]]


# ---------------------------------------------------------------- item 1: amplification

def test_gather_positions_are_bounded_in_count_before_any_work(env):
    """400,000 positions (a 781 KiB request) once built a 614 MB answer in 17 s; now refused at once."""
    channel, stub = infer_stub(env)
    passes = forward_passes(env)
    request = request_of(ids_of(1, 8), ["last_hidden_state"], gather_positions=",".join(["0"] * 400_000))
    with channel:
        error = call_error(stub.ModelInfer, request)
    assert error.code() == INVALID, error.details()
    assert "gather_positions" in error.details() and "400000" in error.details()
    # Refused before any work: the server ran no forward pass for it (the answer is built after one), which
    # holds however slow the machine (a bound on the refusal's wall-clock time did not).
    assert forward_passes(env) == passes
    assert_still_serves(env)


def test_answer_over_the_message_limit_is_refused_before_the_forward_pass(env):
    rows, length = 32, env["positions"]
    answer = rows * length * env["vocab"] * 4
    assert answer > MESSAGE_MB * 1024 * 1024  # the model's logits for this request do not fit
    channel, stub = infer_stub(env)
    passes = forward_passes(env)
    with channel:
        error = call_error(stub.ModelInfer, request_of(ids_of(rows, length), ["logits"]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "--max-message-mb" in error.details() and str(answer) in error.details()
        assert forward_passes(env) == passes  # refused before any forward pass
        # Shaped down (top-k over the vocabulary) the same request fits and is answered (in one or
        # more passes: --max-pass-ms may cut a request of several rows).
        reply = stub.ModelInfer(request_of(ids_of(rows, length), ["logits"], top_k=3), timeout=30)
    assert forward_passes(env) > passes
    assert sorted(o.name for o in reply.outputs) == ["logits_topk_indices", "logits_topk_values"]


def test_an_output_named_twice_is_refused(env):
    channel, stub = infer_stub(env)
    with channel:
        error = call_error(stub.ModelInfer, request_of(ids_of(1, 4), ["logits"] * 50))
    assert error.code() == INVALID and "'logits'" in error.details() and "twice" in error.details()


def test_stream_requests_get_the_same_bounds(env):
    channel, stub = infer_stub(env)
    requests = [request_of(ids_of(1, 8), ["last_hidden_state"], gather_positions=",".join(["1"] * 100_000)),
                request_of(ids_of(32, env["positions"]), ["logits"]),
                request_of(ids_of(1, 4), ["logits"])]
    with channel:
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    errors = sorted(a.error_message.split(":")[0] for a in answers if a.error_message)
    assert errors == ["INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"]
    assert len(answers) == 3


# ---------------------------------------------------------------- item 5: bad input

def test_zero_next_to_huge_dimensions_is_invalid_argument(env):
    request = pb.ModelInferRequest()
    request.inputs.add(name="input_ids", datatype="INT64", shape=[0, 2 ** 62, 2 ** 62])
    request.raw_input_contents.append(b"")
    channel, stub = infer_stub(env)
    with channel:
        error = call_error(stub.ModelInfer, request)
    assert error.code() == INVALID, error.details()
    assert "input_ids" in error.details()


@pytest.mark.parametrize("datatype, field, value", [
    ("INT8", "int_contents", 2147483647), ("INT16", "int_contents", -40000),
    ("UINT8", "uint_contents", 256), ("UINT32", "uint64_contents", 1)])
def test_typed_contents_out_of_range_are_invalid_argument(env, datatype, field, value):
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="input_ids", datatype=datatype, shape=[1, 1])
    getattr(tensor.contents, field).append(value)
    channel, stub = infer_stub(env)
    with channel:
        error = call_error(stub.ModelInfer, request)
    assert error.code() == INVALID, error.details()
    assert "input_ids" in error.details()


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ModelMetadata",
                                    "/splitserve.v1.Generation/Generate"])
def test_invalid_utf8_in_a_string_field_is_invalid_argument(env, method):
    # Field 1 of each request is a string (model_name / name); 0xff 0xfe is not UTF-8.
    payload = b"\x0a\x02\xff\xfe"
    with grpc.insecure_channel(env["handles"]["gpt2"].address) as channel:
        if method.endswith("Generate"):
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(payload, timeout=10))
        else:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                call(payload, timeout=10)
    assert caught.value.code() == INVALID, caught.value.details()
    assert "UTF-8" in caught.value.details() or "parse" in caught.value.details()


@pytest.mark.parametrize("setting", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_generation_settings_are_invalid_argument(env, setting, value):
    settings = generation_pb2.GenerationSettings(max_new_tokens=2, do_sample=True, **{setting: value})
    with grpc.insecure_channel(env["handles"]["gpt2"].address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(generation_pb2.GenerateRequest(input_ids=[5, 6, 7], settings=settings), timeout=30))
    assert caught.value.code() == INVALID, caught.value.details()
    assert setting in caught.value.details()


# ---------------------------------------------------------------- item 6: generation health

def health(address: str, service: str):
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def test_generation_health_is_serving_only_where_the_model_can_generate(env):
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
    tensor_service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    encoder, gpt2 = env["handles"]["fill-mask"].address, env["handles"]["gpt2"].address
    assert health(encoder, "") == SERVING and health(encoder, tensor_service) == SERVING
    assert health(encoder, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(gpt2, service) == SERVING
