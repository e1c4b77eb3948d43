"""Prometheus metrics on both services count real calls (issue 6, item 5)."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from splitserve_pb import generation_pb2, generation_pb2_grpc, preproc_pb2, preproc_pb2_grpc
from tests.ops_helpers import sample, sample_sum, scrape, sentences, tiny_model
from tests.servers import free_port, model_service, preproc_service, wait_for

CLASSIFY = "splitserve.v1.Preproc/Classify"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
GENERATE = "splitserve.v1.Generation/Generate"


@pytest.fixture(scope="module")
def stack():
    model_dir = tiny_model("classifier")
    model_metrics, preproc_metrics = free_port(), free_port()
    with model_service(model_dir, "--metrics-port", str(model_metrics)) as model, \
            preproc_service(model_dir, model.address, "--metrics-port", str(preproc_metrics)) as preproc, \
            grpc.insecure_channel(preproc.address) as channel:
        yield {"stub": preproc_pb2_grpc.PreprocStub(channel), "model_metrics": model_metrics,
               "preproc_metrics": preproc_metrics}


def test_requests_are_counted_by_method_and_code(stack):
    before_pre, before_model = scrape(stack["preproc_metrics"]), scrape(stack["model_metrics"])
    texts = sentences(5)
    for text in texts:
        stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=[text]), timeout=30)
    with pytest.raises(grpc.RpcError) as bad:
        stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=["x"], text_pairs=["a", "b"]), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # (service, metric, labels) -> its growth. A refused call's status reaches the caller before the server
    # counts it (grpc's abort sends the status, then the interceptor records it): wait, bounded, for every
    # count, then check that none went past. One model call per accepted Classify (sequential calls are
    # not coalesced); the bad one never got there.
    expected = {
        ("pre", "splitserve_requests_total", (("method", CLASSIFY), ("code", "OK"))): len(texts),
        ("pre", "splitserve_requests_total", (("method", CLASSIFY), ("code", "INVALID_ARGUMENT"))): 1,
        ("pre", "splitserve_request_duration_seconds_count", (("method", CLASSIFY),)): len(texts) + 1,
        ("model", "splitserve_requests_total", (("method", MODEL_INFER), ("code", "OK"))): len(texts),
        ("model", "splitserve_batch_size_count", ()): len(texts),
        ("model", "splitserve_batch_size_sum", ()): len(texts),  # one row each
    }
    before = {"pre": before_pre, "model": before_model}

    def growth() -> dict:
        after = {"pre": scrape(stack["preproc_metrics"]), "model": scrape(stack["model_metrics"])}
        return {key: sample(after[key[0]], key[1], **dict(key[2])) - sample(before[key[0]], key[1], **dict(key[2]))
                for key in expected}

    wait_for(lambda: all(grew >= expected[key] for key, grew in growth().items()), timeout=60,
                     what="every call to be counted")
    assert growth() == expected
    assert sample(scrape(stack["preproc_metrics"]), "splitserve_requests_in_flight", method=CLASSIFY) == 0
    assert sample(scrape(stack["model_metrics"]), "splitserve_queue_depth") == 0


def test_stream_items_are_counted_each_with_its_own_code(stack):
    before = scrape(stack["preproc_metrics"])
    items = [preproc_pb2.PredictRequest(classify=preproc_pb2.ClassifyRequest(texts=[text])) for text in sentences(3)]
    items.append(preproc_pb2.PredictRequest(classify=preproc_pb2.ClassifyRequest(texts=[])))  # empty: refused
    answers = list(stack["stub"].PredictStream(iter(items), timeout=30))
    assert [a.WhichOneof("result") for a in answers] == ["classify"] * 3 + ["error"]
    after = scrape(stack["preproc_metrics"])

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("splitserve_stream_items_total", method="PredictStream.classify", code="OK") == 3
    assert delta("splitserve_stream_items_total", method="PredictStream.classify", code="INVALID_ARGUMENT") == 1
    assert delta("splitserve_requests_total", method="splitserve.v1.Preproc/PredictStream", code="OK") == 1


def test_stage_latencies_are_recorded_on_both_sides(stack):
    before_pre, before_model = scrape(stack["preproc_metrics"]), scrape(stack["model_metrics"])
    reply = stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=sentences(3)), timeout=30)
    after_pre, after_model = scrape(stack["preproc_metrics"]), scrape(stack["model_metrics"])
    for stage in ("tokenize", "hop", "postprocess"):
        grew = (sample(after_pre, "splitserve_stage_duration_seconds_count", stage=stage)
                - sample(before_pre, "splitserve_stage_duration_seconds_count", stage=stage))
        assert grew >= 1, f"preproc stage {stage} not recorded"
    for stage in ("queue", "forward"):
        grew = (sample(after_model, "splitserve_stage_duration_seconds_count", stage=stage)
                - sample(before_model, "splitserve_stage_duration_seconds_count", stage=stage))
        assert grew >= 1, f"model_service stage {stage} not recorded"
    # Each answer carries its own stage timings too.
    timings = reply.meta.timings_ms
    assert {"tokenize", "postprocess", "total"} <= set(timings)
    assert all(value >= 0 for value in timings.values())
    assert timings["total"] >= timings["tokenize"]


def families(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name for family in text_string_to_metric_families(text)}


def test_each_service_exports_what_it_produces_and_health_is_not_a_request(stack):
    stack["stub"].Classify(preproc_pb2.ClassifyRequest(texts=["the river"]), timeout=30)
    preproc, model = scrape(stack["preproc_metrics"]), scrape(stack["model_metrics"])
    model_only = {"splitserve_batch_size", "splitserve_queue_depth", "splitserve_generated_tokens",
                  "splitserve_time_to_first_token_seconds", "splitserve_time_per_output_token_seconds",
                  "splitserve_prompt_tokens", "splitserve_generation_sequences"}
    assert not model_only & families(preproc)  # no always-zero series on the service that never produces them
    assert {"splitserve_batch_size", "splitserve_queue_depth"} <= families(model)
    # The readiness checks (many, before the test) are not requests.
    for text in (preproc, model):
        assert "grpc.health" not in text and "grpc.reflection" not in text
    # The served model's name labels the requests on both sides; no adapter was asked for.
    from prometheus_client.parser import text_string_to_metric_families

    def models(text, method):
        return {s.labels["model"] for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "splitserve_requests_total" and s.labels["method"] == method}
    assert models(preproc, CLASSIFY) == models(model, MODEL_INFER) != {""}
    assert sample(model, "splitserve_requests_total", method=MODEL_INFER, code="OK", adapter="") >= 1


@contextlib.contextmanager
def preproc_with_metrics(model_dir):
    """Both services on `model_dir`; yields a Preproc stub and preproc's metrics port."""
    metrics_port = free_port()
    with model_service(model_dir, "--metrics-port", "0") as model, \
            preproc_service(model_dir, model.address, "--metrics-port", str(metrics_port)) as preproc, \
            grpc.insecure_channel(preproc.address) as channel:
        yield preproc_pb2_grpc.PreprocStub(channel), metrics_port


def test_embed_records_its_postprocess_stage(tmp_path):
    from tests.preproc_helpers import build_task_model

    model_dir, _, _ = build_task_model(tmp_path, "feature-extraction")
    with preproc_with_metrics(model_dir) as (stub, metrics_port):
        before = scrape(metrics_port)
        for pooling in ("none", "mean"):
            stub.Embed(preproc_pb2.EmbedRequest(texts=sentences(2), pooling=pooling), timeout=30)
        after = scrape(metrics_port)
    assert (sample(after, "splitserve_stage_duration_seconds_count", stage="postprocess")
            - sample(before, "splitserve_stage_duration_seconds_count", stage="postprocess")) == 2


def test_generation_metrics():
    metrics_port = free_port()
    with model_service(tiny_model("gpt2"), "--metrics-port", str(metrics_port)) as model, \
            grpc.insecure_channel(model.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        before = scrape(metrics_port)
        generated = 0
        for max_new in (3, 7):
            request = generation_pb2.GenerateRequest(
                input_ids=[5, 6, 7], settings=generation_pb2.GenerationSettings(max_new_tokens=max_new,
                                                                                 ignore_eos=True))
            steps = list(stub.Generate(request, timeout=60))
            generated += sum(len(step.token_ids) for step in steps)
        after = scrape(metrics_port)

    def delta(name, **labels):
        return sample_sum(after, name, **labels) - sample_sum(before, name, **labels)

    assert generated == 10
    assert delta("splitserve_generated_tokens_total", adapter="") == generated
    assert delta("splitserve_prompt_tokens_total", adapter="") == 6
    assert delta("splitserve_time_to_first_token_seconds_count") == 2
    assert delta("splitserve_time_per_output_token_seconds_count") == 2
    # Mean time between tokens: positive and no longer than the whole generation took.
    assert 0 < delta("splitserve_time_per_output_token_seconds_sum") < delta(
        "splitserve_request_duration_seconds_sum", method=GENERATE)
    assert delta("splitserve_stage_duration_seconds_count", stage="queue") == 2  # each waited for admission
    assert delta("splitserve_stage_duration_seconds_count", stage="prefill") == 2
    assert delta("splitserve_stage_duration_seconds_count", stage="decode") == generated - 2
    assert sample(after, "splitserve_generation_sequences", state="running") == 0
    assert sample(after, "splitserve_generation_sequences", state="waiting") == 0
    assert delta("splitserve_requests_total", method=GENERATE, code="OK") == 2
    assert sample_sum(after, "splitserve_requests_in_flight") == 0
    model_names = {s for s in after.splitlines() if s.startswith("splitserve_generated_tokens_total{")}
    assert model_names and all('model="' in line and 'model=""' not in line for line in model_names)


def test_preproc_generation_records_hop_and_detokenize(tmp_path):
    from tests.generation_helpers import save_generative

    model_dir = save_generative(tmp_path / "gpt2")
    with preproc_with_metrics(model_dir) as (stub, metrics_port):
        before = scrape(metrics_port)
        params = preproc_pb2.GenerateTextParameters(max_new_tokens=5)
        stub.GenerateText(preproc_pb2.GenerateTextRequest(prompt="the river", parameters=params), timeout=60)
        list(stub.GenerateTextStream(preproc_pb2.GenerateTextRequest(prompt="the river", parameters=params),
                                     timeout=60))
        after = scrape(metrics_port)
    for stage in ("tokenize", "hop", "detokenize"):
        grew = (sample(after, "splitserve_stage_duration_seconds_count", stage=stage)
                - sample(before, "splitserve_stage_duration_seconds_count", stage=stage))
        assert grew == 2, f"preproc generation stage {stage}: {grew}"
