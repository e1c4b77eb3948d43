"""Fuzz tier over every preproc_service RPC (issue 12, "Show"): hypothesis draws request messages
of each method's type (tests/fuzz_helpers.py: every field ordinary, at its edges or hostile) and
sends them to a real preproc_service + model_service pair serving the method's task. Every
answer is OK or a documented client-error code (never INTERNAL, UNKNOWN or a dropped call), and
afterwards both services are SERVING and answer a normal request exactly as before the fuzz.

CI runs SPLITSERVE_FUZZ_EXAMPLES cases per RPC (default 100); set it higher for a longer run.
"""

from __future__ import annotations

import contextlib
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve_common.tasks import spec
from splitserve_pb import preproc_pb2 as pb
from tests import model_factory, servers
from tests.fuzz_helpers import CLIENT_ERRORS, messages

FUZZ_EXAMPLES = int(os.environ.get("SPLITSERVE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SERVICE = pb.DESCRIPTOR.services_by_name["Preproc"]
TIMEOUT = 60.0
# RPCs every deployment serves, whatever its task (fuzzed on the first one).
COMMON_RPCS = ("Tokenize", "Detokenize", "Info", "PredictStream")
SMALL = st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 2 ** 31 - 1]))
# Fields whose ordinary values cost time per unit (new tokens, beams, choices, windows): small,
# or an extreme that must be refused before any work.
FIELDS = {name: SMALL for name in ("max_new_tokens", "min_new_tokens", "max_tokens", "max_completion_tokens", "n",
                                   "num_beams", "num_return_sequences", "no_repeat_ngram_size", "logprobs",
                                   "top_logprobs")}


def _encoder(root, task):
    model, tokenizer = model_factory.build_encoder(task, seed=5)
    return model_factory.save_components(root / task, model, tokenizer, task), [], []


def _gpt2(root, task):
    model, tokenizer = model_factory.build_gpt2(seed=5)
    return model_factory.save_components(root / task, model, tokenizer, task), [], []


def _tapas(root, task):
    model, tokenizer = model_factory.build_tapas(root, seed=5)
    directory = model_factory.save_components(root / task, model, tokenizer, task,
                                              instance_type="TableQuestionAnsweringPipeline")
    return directory, ["--max-table-cells", "40"], []


def _audio_classifier(root, task):
    model, fe = model_factory.build_audio_classifier(seed=5)
    directory = model_factory.save_audio_components(root / task, model, task, "AudioClassificationPipeline", fe)
    return directory, [], []


def _speech(root, task):
    model, tokenizer, fe = model_factory.build_wav2vec2_ctc(root, seed=5)
    directory = model_factory.save_audio_components(root / task, model, task, "AutomaticSpeechRecognitionPipeline",
                                                    fe, tokenizer, as_processor=True)
    clips = root / "clips"
    clips.mkdir(exist_ok=True)
    return directory, ["--audio-root", str(clips)], ["--max-input-values", str(4 * 16000)]


BUILDERS = {
    "text-classification": _encoder, "token-classification": _encoder, "fill-mask": _encoder,
    "question-answering": _encoder, "zero-shot-classification": _encoder, "feature-extraction": _encoder,
    "text-generation": _gpt2, "table-question-answering": _tapas, "audio-classification": _audio_classifier,
    "automatic-speech-recognition": _speech,
}
# A normal request per task, compared before and after the fuzz.
NORMAL = {
    "text-classification": ("Classify", pb.ClassifyRequest(texts=["the old market"])),
    "token-classification": ("ClassifyTokens", pb.ClassifyTokensRequest(texts=["Alice walked to Paris"])),
    "fill-mask": ("FillMask", pb.FillMaskRequest(texts=["the old [MASK]"])),
    "question-answering": ("AnswerQuestion", pb.AnswerQuestionRequest(
        inputs=[pb.QuestionContext(question="who?", context="Alice lives in Paris with Bob.")])),
    "zero-shot-classification": ("ZeroShotClassify", pb.ZeroShotClassifyRequest(
        texts=["the old market"], candidate_labels=["trade", "river"])),
    "feature-extraction": ("Embed", pb.EmbedRequest(texts=["the old market"])),
    "text-generation": ("GenerateText", pb.GenerateTextRequest(
        prompt="the river", parameters=pb.GenerateTextParameters(max_new_tokens=4))),
    "table-question-answering": ("AnswerTableQuestion", pb.TableQuestionRequest(
        inputs=[pb.TableQuery(table='{"city": ["Paris", "Rome"], "people": ["2", "3"]}', queries=["how many?"])])),
    "audio-classification": ("Info", pb.InfoRequest()),
    "automatic-speech-recognition": ("Info", pb.InfoRequest()),
}


def method_call(channel: grpc.Channel, name: str):
    """Call `name` with a request and return its answers as a list (one for a unary RPC)."""
    method = SERVICE.methods_by_name[name]
    path = f"/{SERVICE.full_name}/{name}"
    from google.protobuf import message_factory

    response_class = message_factory.GetMessageClass(method.output_type)
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[(method.client_streaming, method.server_streaming)](
        path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_class.FromString)

    def invoke(request):
        answer = call(iter(request) if method.client_streaming else request, timeout=TIMEOUT)
        return list(answer) if method.server_streaming else [answer]

    return invoke


def requests_for(name: str):
    method = SERVICE.methods_by_name[name]
    one = messages(method.input_type, FIELDS)
    return st.lists(one, min_size=1, max_size=4) if method.client_streaming else one


@contextlib.contextmanager
def deployment(root, task):
    directory, preproc_args, model_args = BUILDERS[task](root, task)
    with servers.model_service(directory, "--metrics-port", "0", *model_args, wait=False) as model, \
            servers.preproc_service(directory, model.address, "--metrics-port", "0", *preproc_args) as preproc:
        model.wait_serving()
        with grpc.insecure_channel(preproc.address) as channel:
            yield model, preproc, channel


def fuzz(channel, name: str) -> None:
    invoke = method_call(channel, name)

    @FUZZ
    @given(requests_for(name))
    def case(request):
        try:
            invoke(request)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, f"{name}: {exc.code().name}: {exc.details()}\nrequest: {request}"
            assert exc.details(), f"{name}: {exc.code().name} without a message"

    case()


def fuzz_undecodable(channel) -> None:
    """Arbitrary bytes as the request message of every method (invalid UTF-8 in a string field, ...)."""
    names = list(SERVICE.methods_by_name)

    @FUZZ
    @given(st.sampled_from(names), st.binary(max_size=48))
    def case(name, payload):
        method = SERVICE.methods_by_name[name]
        path = f"/{SERVICE.full_name}/{name}"
        try:
            if method.client_streaming:
                list(channel.stream_stream(path)(iter([payload]), timeout=TIMEOUT))
            elif method.server_streaming:
                list(channel.unary_stream(path)(payload, timeout=TIMEOUT))
            else:
                channel.unary_unary(path)(payload, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_ERRORS, f"{name}: {exc.code().name}: {exc.details()}\npayload: {payload!r}"

    case()


@pytest.mark.parametrize("task", list(BUILDERS))
def test_every_rpc_of_the_task_answers_ok_or_a_client_error(tmp_path, task):
    rpcs = list(spec(task).rpcs) + (list(COMMON_RPCS) if task == "text-classification" else [])
    normal_name, normal_request = NORMAL[task]
    with deployment(tmp_path, task) as (model, preproc, channel):
        before = method_call(channel, normal_name)(normal_request)
        for name in rpcs:
            fuzz(channel, name)
        if task == "text-classification":
            fuzz_undecodable(channel)
        for handle in (model, preproc):
            assert servers.health_status(handle.address) == health_pb2.HealthCheckResponse.SERVING
        after = method_call(channel, normal_name)(normal_request)
    strip = [_without_timings(a) for a in before], [_without_timings(a) for a in after]
    assert strip[0] == strip[1]


def _without_timings(answer):
    answer = type(answer).FromString(answer.SerializeToString())
    if "meta" in answer.DESCRIPTOR.fields_by_name:
        answer.meta.ClearField("timings_ms")
    for field in ("id", "created"):
        if field in answer.DESCRIPTOR.fields_by_name:
            answer.ClearField(field)
    return answer

