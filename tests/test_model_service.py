"""model_service over real gRPC on loopback, with tiny models built here and the real MiniLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
import torch

from client.tensor_client import AsyncTensorClient, TensorClient
from splitserve_common.v2_codec import encode_request
from splitserve_pb import adapters_pb2, adapters_pb2_grpc
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc
from tests import model_factory, servers
from tests.adapter_helpers import TOKEN_METADATA, management_flags
from tests.model_service_helpers import (
    NOT_SERVING,
    SERVING,
    TASKS,
    build_task_models,
    encode,
    masked,
    model_services,
    reference,
)

# float32: 1e-5 absolute, and relative for logits of larger magnitude (summation order differs
# between batch shapes and thread counts).
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def same_threads_as_the_service():
    """The reference runs with the service's torch thread count, so reductions split alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(servers.TORCH_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_service")
    models = build_task_models(root)
    base, tokenizer = model_factory.build_encoder("text-classification", seed=7)
    peft_model = model_factory.build_lora(base, seed=3)
    peft_dir = model_factory.save_peft_components(root / "peft", peft_model, tokenizer, "text-classification",
                                                  "TextClassificationPipeline")
    specs = {task: (directory, []) for task, (directory, _, _) in models.items()}
    # Long wait and a small batch limit here: concurrent calls surely share batches.
    specs["text-classification"] = (specs["text-classification"][0], ["--max-wait-us", "150000",
                                                                       "--max-batch-size", "8"])
    specs["peft"] = (peft_dir, management_flags(root))
    specs["minilm"] = (model_factory.minilm_dir(), ["--model-name", "minilm"])
    with model_services(specs, log_dir=root / "logs") as handles:
        yield {"models": models, "handles": handles, "peft": (peft_model, tokenizer)}


def address(env, key):
    return env["handles"][key].address


# ---------------------------------------------------------------- equality with in-process forward

@pytest.mark.parametrize("task", TASKS)
def test_outputs_equal_in_process_forward(env, task):
    _, model, tokenizer = env["models"][task]
    inputs = encode(tokenizer, task)
    ref = reference(model, inputs)
    names = sorted(ref)
    with TensorClient(address(env, task)) as client:
        out = client.infer(inputs, outputs=names)
    mask = inputs["attention_mask"]
    assert set(out) == set(names)
    for name in names:
        along_sequence = name in ("start_logits", "end_logits") or ref[name].ndim >= 3
        expected = masked(ref[name], mask) if along_sequence else ref[name]
        assert out[name].shape == expected.shape, name
        np.testing.assert_allclose(out[name], expected, atol=TOL, rtol=TOL, err_msg=name)


def test_default_outputs_follow_the_task(env):
    _, model, tokenizer = env["models"]["question-answering"]
    inputs = encode(tokenizer, "question-answering")
    with TensorClient(address(env, "question-answering")) as client:
        out = client.infer(inputs)
        meta = client.metadata()
    assert sorted(out) == ["end_logits", "start_logits"]
    assert meta.task == "question-answering"


def test_typed_contents_accepted(env):
    _, model, tokenizer = env["models"]["fill-mask"]
    ids = np.asarray([tokenizer("the river is long")["input_ids"]], dtype=np.int64)
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    tensor.contents.int64_contents.extend(ids.ravel().tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(address(env, "fill-mask")) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    logits = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(tuple(reply.outputs[0].shape))
    np.testing.assert_allclose(logits, reference(model, {"input_ids": ids})["logits"], atol=TOL, rtol=TOL)


def test_unpadded_rows_without_mask_equal_padded(env):
    """Rows sent one by one without attention_mask give the rows of the padded batch."""
    _, model, tokenizer = env["models"]["token-classification"]
    inputs = encode(tokenizer, "token-classification")
    ref = reference(model, inputs)["logits"]
    lengths = inputs["attention_mask"].sum(1)
    with TensorClient(address(env, "token-classification")) as client:
        for i, n in enumerate(lengths):
            out = client.infer({"input_ids": inputs["input_ids"][i:i + 1, :n]}, outputs=["logits"])
            np.testing.assert_allclose(out["logits"][0], ref[i, :n], atol=TOL, rtol=TOL)


def test_metadata_parameters(env):
    _, model, tokenizer = env["models"]["token-classification"]
    with TensorClient(address(env, "token-classification")) as client:
        meta = client.metadata()
    assert meta.name == "token-classification"
    assert meta.id2label == dict(model.config.id2label)
    assert meta.labels == [model.config.id2label[i] for i in range(len(model.config.id2label))]
    assert meta.max_position_embeddings == model.config.max_position_embeddings
    assert meta.vocab_size == model.config.vocab_size
    assert meta.pad_token_id == tokenizer.pad_token_id
    assert meta.dtype == "float32" and meta.device == "cpu"
    assert meta.adapters == [] and meta.default_outputs == ["logits"]
    assert {"input_ids", "attention_mask", "token_type_ids"} <= {t.name for t in meta.inputs}
    logits = next(t for t in meta.outputs if t.name == "logits")
    assert logits.shape == [-1, -1, len(model.config.id2label)]


# ---------------------------------------------------------------- shaping

def test_top_k_gather_and_fp16(env):
    _, model, tokenizer = env["models"]["fill-mask"]
    inputs = encode(tokenizer, "fill-mask")
    logits = reference(model, inputs)["logits"]
    with TensorClient(address(env, "fill-mask")) as client:
        out = client.infer(inputs, outputs=["logits"],
                           parameters={"top_k": 5, "gather_positions": "1,2", "datatype": "FP16"})
    values, indices = out["logits_topk_values"], out["logits_topk_indices"]
    assert values.dtype == np.float16 and indices.dtype == np.int64 and values.shape == (len(inputs["input_ids"]), 2, 5)
    expected = torch.topk(torch.from_numpy(logits[:, [1, 2]]), 5, dim=-1)
    np.testing.assert_array_equal(indices, expected.indices.numpy())
    np.testing.assert_allclose(values, expected.values.numpy(), atol=1e-2, rtol=1e-3)


def test_per_output_parameters_override_request(env):
    _, model, tokenizer = env["models"]["feature-extraction"]
    inputs = encode(tokenizer, "feature-extraction")
    with TensorClient(address(env, "feature-extraction")) as client:
        out = client.infer(inputs, outputs=["pooler_output", "last_hidden_state"], parameters={"top_k": 3},
                           output_parameters={"pooler_output": {"top_k": 0}})
    assert out["pooler_output"].shape == (len(inputs["input_ids"]), 32)
    assert out["last_hidden_state_topk_values"].shape == (*inputs["input_ids"].shape, 3)


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_modes(env, mode):
    _, model, tokenizer = env["models"]["feature-extraction"]
    inputs = encode(tokenizer, "feature-extraction")
    hidden = torch.from_numpy(reference(model, inputs)["last_hidden_state"])
    mask = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).float()
    if mode == "mean":
        expected = (hidden * mask).sum(1) / mask.sum(1)
    elif mode == "cls":
        expected = hidden[:, 0]
    else:
        expected = hidden.masked_fill(mask == 0, -1e9).max(1).values
    expected = torch.nn.functional.normalize(expected, dim=-1)
    with TensorClient(address(env, "feature-extraction")) as client:
        out = client.infer(inputs, outputs=["sentence_embedding"], parameters={"pooling": mode, "normalize": True})
    np.testing.assert_allclose(out["sentence_embedding"], expected.numpy(), atol=TOL, rtol=TOL)


def test_minilm_sentence_embedding_equals_mean_pooling_normalized(env):
    from transformers import AutoModel, AutoTokenizer

    directory = model_factory.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank today."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    inputs = {k: v.numpy().astype(np.int64) for k, v in enc.items()}
    with TensorClient(address(env, "minilm")) as client:
        out = client.infer(inputs, outputs=["sentence_embedding"])  # pooling config from 1_Pooling + Normalize
        meta = client.metadata()
    np.testing.assert_allclose(out["sentence_embedding"], expected, atol=TOL, rtol=TOL)
    assert meta.pooling == {"mode": "mean", "normalize": True}
    assert meta.task == "feature-extraction"


# ---------------------------------------------------------------- PEFT artifact

def test_mlflow_peft_artifact_equals_peft_model(env):
    peft_model, tokenizer = env["peft"]
    inputs = {k: v.astype(np.int64) for k, v in tokenizer(["Alice went to Paris.", "the river"], padding=True,
                                                            return_tensors="np").items()}
    expected = reference(peft_model, inputs)["logits"]
    with TensorClient(address(env, "peft")) as client:
        out = client.infer(inputs, outputs=["logits"])
    np.testing.assert_allclose(out["logits"], expected, atol=TOL, rtol=TOL)
    # The adapter matters: the base model alone answers differently.
    with peft_model.disable_adapter():
        base = reference(peft_model, inputs)["logits"]
    assert np.abs(base - expected).max() > 1e-2


def test_mlflow_peft_adapter_is_a_named_default_adapter(env):
    """The artifact's peft/ is served under the model's name and answers requests that name none;
    `adapter: base` reaches the base model; the default cannot be unloaded under its users."""
    peft_model, tokenizer = env["peft"]
    inputs = {k: v.astype(np.int64) for k, v in tokenizer(["the old market"], return_tensors="np").items()}
    with peft_model.disable_adapter():
        base = reference(peft_model, inputs)["logits"]
    tuned = reference(peft_model, inputs)["logits"]
    with TensorClient(address(env, "peft")) as client:
        meta = client.metadata()
        assert meta.adapters == ["peft"]
        assert meta.default_adapter == "peft"
        by_name = client.infer(inputs, outputs=["logits"], parameters={"adapter": "peft"})["logits"]
        as_base = client.infer(inputs, outputs=["logits"], parameters={"adapter": "base"})["logits"]
    np.testing.assert_allclose(by_name, tuned, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(as_base, base, atol=TOL, rtol=TOL)
    with grpc.insecure_channel(address(env, "peft")) as channel, pytest.raises(grpc.RpcError) as refused:
        adapters_pb2_grpc.AdaptersStub(channel).UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="peft"),
                                                              timeout=10, metadata=TOKEN_METADATA)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "loaded at start" in refused.value.details()


# ---------------------------------------------------------------- batching

def test_concurrent_requests_share_batches_and_match_unbatched(env):
    _, model, tokenizer = env["models"]["text-classification"]
    texts = [" ".join(model_factory.WORDS[i:i + 3 + (i % 9)]) for i in range(16)]
    rows = [np.asarray([tokenizer(t)["input_ids"]], dtype=np.int64) for t in texts]
    alone = [reference(model, {"input_ids": r})["logits"] for r in rows]

    async def concurrently():
        async with AsyncTensorClient(address(env, "text-classification")) as client:
            unary = [client.infer({"input_ids": r}, outputs=["logits"], request_id=str(i))
                     for i, r in enumerate(rows[:12])]
            streamed = [encode_request({"input_ids": r}, ["logits"], request_id=str(12 + i))
                        for i, r in enumerate(rows[12:])]

            async def stream():
                return [item async for item in client.stream_infer(streamed)]

            return await asyncio.gather(*unary, stream())

    *unary_results, stream_results = asyncio.run(concurrently())
    results = {r.id: r for r in unary_results}
    for result, error in stream_results:
        assert error == ""
        results[result.id] = result
    assert len(results) == 16
    sizes = [r.parameters["batch_size"] for r in results.values()]
    assert max(sizes) > 1 and max(sizes) <= 8
    for i, result in results.items():
        np.testing.assert_allclose(result["logits"], alone[int(i)], atol=TOL, rtol=TOL)
    with TensorClient(address(env, "text-classification")) as client:
        single = client.infer({"input_ids": rows[0]}, outputs=["logits"])
    assert single.parameters["batch_size"] == 1
    np.testing.assert_allclose(single["logits"], alone[0], atol=TOL, rtol=TOL)


def test_padded_requests_come_back_in_their_own_layout_batched_or_alone(env):
    """A padded multi-row request's rows either share forward passes with other requests' rows (cut
    back and restacked) or form a batch alone (returned as computed): either way its caller gets its
    own [B, L, H] with zeros past each row's length."""
    _, model, tokenizer = env["models"]["text-classification"]
    groups = [[" ".join(model_factory.WORDS[i + j:i + j + 2 + 3 * j]) for j in range(3)] for i in range(6)]
    requests = [{k: v.astype(np.int64) for k, v in tokenizer(g, padding=True, return_tensors="np").items()}
                for g in groups]
    expected = []
    for inputs in requests:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
        expected.append(masked(out.hidden_states[-1].numpy(), inputs["attention_mask"]))

    async def concurrently():
        async with AsyncTensorClient(address(env, "text-classification")) as client:
            return await asyncio.gather(*(client.infer(r, outputs=["last_hidden_state"]) for r in requests))

    results = asyncio.run(concurrently())
    assert max(r.parameters["batch_size"] for r in results) > 3  # rows of several requests shared a pass
    with TensorClient(address(env, "text-classification")) as client:
        alone = client.infer(requests[0], outputs=["last_hidden_state"])
    assert alone.parameters["batch_size"] == 3
    for result, want in zip([*results, alone], [*expected, expected[0]], strict=True):
        np.testing.assert_allclose(result["last_hidden_state"], want, atol=TOL, rtol=TOL)


def test_stream_reports_errors_per_request_and_goes_on(env):
    good = encode_request({"input_ids": np.array([[2, 10, 11, 3]])}, ["logits"], request_id="good")
    bad = encode_request({"input_ids": np.array([[2, 10, 11, 3]])}, ["nope"], request_id="bad")

    async def run():
        async with AsyncTensorClient(address(env, "text-classification")) as client:
            return [item async for item in client.stream_infer([bad, good])]

    answers = asyncio.run(run())
    assert len(answers) == 2
    errors = [e for r, e in answers if e]
    oks = [r for r, e in answers if not e]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0] and "nope" in errors[0]
    assert len(oks) == 1 and oks[0].id == "good"


# ---------------------------------------------------------------- errors

def _request(**overrides):
    ids = np.array([[2, 10, 11, 12, 3]], dtype=np.int64)
    request = encode_request({"input_ids": ids}, ["logits"])
    for key, value in overrides.items():
        value(request) if key == "mutate" else setattr(request, key, value)
    return request


def _set_raw(raw):
    def mutate(request):
        request.raw_input_contents[0] = raw
    return mutate


def _set(field, value):
    def mutate(request):
        getattr(request.inputs[0], field)[:] = value if isinstance(value, list) else [value]
    return mutate


def _datatype(value):
    def mutate(request):
        request.inputs[0].datatype = value
    return mutate


BAD_REQUESTS = {
    "byte count": (_request(mutate=_set_raw(b"\x00" * 7)), grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
    "unknown datatype": (_request(mutate=_datatype("INT128")), grpc.StatusCode.INVALID_ARGUMENT, "unknown datatype"),
    "float ids": (_request(mutate=_datatype("FP64")), grpc.StatusCode.INVALID_ARGUMENT, "integer"),
    "wrong rank": (_request(mutate=_set("shape", [5])), grpc.StatusCode.INVALID_ARGUMENT, "rank 2"),
    "too long": (encode_request({"input_ids": np.full((1, 65), 5)}), grpc.StatusCode.INVALID_ARGUMENT,
                 "longer than the model's 64 positions"),
    "batch over limit": (encode_request({"input_ids": np.full((9, 4), 5)}), grpc.StatusCode.INVALID_ARGUMENT,
                         "over the limit of 8"),
    "mask shape": (encode_request({"input_ids": np.full((2, 4), 5), "attention_mask": np.ones((2, 3))
                                  .astype(np.int64)}), grpc.StatusCode.INVALID_ARGUMENT, "attention_mask"),
    "left padding": (encode_request({"input_ids": np.full((1, 4), 5), "attention_mask": np.array([[0, 1, 1, 1]])}),
                     grpc.StatusCode.INVALID_ARGUMENT, "right-padded"),
    "mask not 0/1": (encode_request({"input_ids": np.full((1, 4), 5), "attention_mask": np.array([[1, 2, 1, 0]])}),
                     grpc.StatusCode.INVALID_ARGUMENT, "only 0 and 1"),
    "id outside vocab": (encode_request({"input_ids": np.array([[2, 100000, 3]])}), grpc.StatusCode.INVALID_ARGUMENT,
                         "outside the vocabulary"),
    "unknown input": (encode_request({"input_ids": np.full((1, 4), 5), "pixel_values": np.full((1, 4), 5)}),
                      grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'pixel_values'"),
    "unknown output": (encode_request({"input_ids": np.full((1, 4), 5)}, ["logitz"]),
                       grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'logitz'"),
    "unknown parameter": (encode_request({"input_ids": np.full((1, 4), 5)}, parameters={"temprature": 1.0}),
                          grpc.StatusCode.INVALID_ARGUMENT, "temprature"),
    "parameter type": (encode_request({"input_ids": np.full((1, 4), 5)}, parameters={"top_k": "three"}),
                       grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "gather out of range": (encode_request({"input_ids": np.full((1, 4), 5)}, parameters={"gather_positions": "9"}),
                            grpc.StatusCode.INVALID_ARGUMENT, "gather_positions"),
    "unknown adapter": (encode_request({"input_ids": np.full((1, 4), 5)}, parameters={"adapter": "x"}),
                        grpc.StatusCode.NOT_FOUND, "adapter 'x'"),
    "unknown model": (encode_request({"input_ids": np.full((1, 4), 5)}, model_name="gpt-9"),
                      grpc.StatusCode.NOT_FOUND, "gpt-9"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_status_and_service_keeps_serving(env, case):
    request, code, text = BAD_REQUESTS[case]
    with grpc.insecure_channel(address(env, "text-classification")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert text in info.value.details()
        good = stub.ModelInfer(_request(), timeout=30)
        assert good.outputs[0].name == "logits" and list(good.outputs[0].shape) == [1, 3]


def test_unknown_model_metadata_is_not_found(env):
    with grpc.insecure_channel(address(env, "text-classification")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.ModelReady(pb.ModelReadyRequest(name="text-classification"), timeout=10).ready
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


# ---------------------------------------------------------------- health, stock client

def test_health_went_not_serving_then_serving(env):
    for key, handle in env["handles"].items():
        seen = [s for s in handle.statuses if s is not None]
        assert seen[-1] == SERVING, key
        assert SERVING not in seen[:-1], key
    # Loading the real MiniLM takes long enough that the poller always sees the NOT_SERVING phase.
    assert NOT_SERVING in env["handles"]["minilm"].statuses


TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as triton

    address, model, ids_path = sys.argv[1:4]
    client = triton.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    meta = client.get_model_metadata(model, as_json=True)
    ids = np.load(ids_path)
    inp = triton.InferInput("input_ids", list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = client.infer(model, [inp], outputs=[triton.InferRequestedOutput("logits")])
    np.save(ids_path + ".logits.npy", result.as_numpy("logits"))
    print(json.dumps({"outputs": [o["name"] for o in meta["outputs"]], "name": meta["name"]}))
""")


def test_tritonclient_reads_metadata_and_infers(env, tmp_path):
    _, model, tokenizer = env["models"]["text-classification"]
    ids = np.asarray([tokenizer("Alice walked to the river in Paris.")["input_ids"]], dtype=np.int64)
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, ids)
    # tritonclient's protobuf module defines inference.* too: it runs in its own process.
    done = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, address(env, "text-classification"),
                           "text-classification", str(ids_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    assert meta["name"] == "text-classification" and "logits" in meta["outputs"]
    logits = np.load(str(ids_path) + ".logits.npy")
    np.testing.assert_allclose(logits, reference(model, {"input_ids": ids})["logits"], atol=TOL, rtol=TOL)
