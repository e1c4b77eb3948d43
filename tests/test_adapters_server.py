"""Adapters through the real model_service: per-request adapters on ModelInfer and Generate under
concurrency against in-process PeftModels, run-time load/unload/list, refusals, access control."""

from __future__ import annotations

import asyncio
import copy

import grpc
import numpy as np
import pytest
import torch

from splitserve_common import v2_codec
from splitserve_pb import adapters_pb2, adapters_pb2_grpc, generation_pb2, generation_pb2_grpc
from splitserve_pb import open_inference_pb2 as v2
from splitserve_pb import open_inference_pb2_grpc as v2_grpc
from tests import adapter_helpers as ah
from tests import model_factory as mf
from tests import servers

SENTENCES = mf.SENTENCES
PROMPTS = ["the river", "alice walks in", "the", "music of the", "who is", "a large city"]
TOKEN = ah.TOKEN
GOOD = ah.TOKEN_METADATA
GPT2_RANKS = {name: spec[1] for name, spec in ah.GPT2_ADAPTERS.items()}
# One torch thread: on a small shared CPU, intra-op threads spinning on each other slow the
# many small LoRA matmuls by orders of magnitude.
SERVER_ARGS = ("--metrics-port", "0", "--torch-threads", "1")


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters_encoder")
    base, tok = mf.build_encoder("text-classification")
    model_dir = mf.save_components(root / "model", base, tok, "text-classification")
    dirs = ah.save_adapters(base, root / "adapters", ah.ENCODER_ADAPTERS)
    with servers.model_service(model_dir, *SERVER_ARGS, "--adapter", f"alpha={dirs['alpha']}",
                               "--max-wait-us", "20000", *ah.management_flags(root)) as server:
        yield {"server": server, "base": base, "tok": tok, "dirs": dirs, "root": root,
               "refs": ah.reference_models(base, dirs)}


@pytest.fixture(scope="module")
def gpt2_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters_gpt2")
    base, tok = mf.build_gpt2()
    model_dir = mf.save_components(root / "model", base, tok, "text-generation",
                                   instance_type="TextGenerationPipeline")
    dirs = ah.save_adapters(base, root / "adapters", ah.GPT2_ADAPTERS)
    with servers.model_service(model_dir, *SERVER_ARGS, "--adapter", f"alpha={dirs['alpha']}",
                               *ah.management_flags(root / "adapters")) as server:
        stub = adapters_stub(server.address)
        for name in ("beta", "gamma"):  # loaded at run time: the API may unload them
            stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name, path=str(dirs[name])), metadata=GOOD)
        yield {"server": server, "base": base, "tok": tok, "dirs": dirs, "refs": ah.reference_models(base, dirs)}


def infer_request(tok, texts, adapter=""):
    enc = tok(texts, padding=True, return_tensors="np")
    inputs = {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    request = v2_codec.encode_request(inputs, ["logits"], {"adapter": adapter or None})
    return request, enc


def logits_of(response) -> np.ndarray:
    return v2_codec.decode_response(response)["logits"]


def expected_logits(ref, enc) -> np.ndarray:
    with torch.inference_mode():
        return ref(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in enc.items()}).logits.numpy()


def adapters_stub(address):
    return adapters_pb2_grpc.AdaptersStub(grpc.insecure_channel(address))


def ensure_loaded(fixture, name):
    """Load `name` unless an earlier test did (so each test also runs alone)."""
    stub = adapters_stub(fixture["server"].address)
    if name not in [a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters]:
        stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name, path=str(fixture["dirs"][name])), metadata=GOOD)


def test_startup_adapter_and_runtime_loads_are_listed(encoder_server):
    stub = adapters_stub(encoder_server["server"].address)
    assert [a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters] == ["alpha"]
    for name in ("beta", "gamma"):
        info = stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name, path=str(encoder_server["dirs"][name])),
                                metadata=GOOD)
        assert (info.name, info.method, info.source) == (name, "LORA", str(encoder_server["dirs"][name]))
    listed = {a.name: a for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters}
    assert sorted(listed) == ["alpha", "beta", "gamma"]
    assert (listed["gamma"].rank, list(listed["gamma"].target_modules)) == (8, ["value"])
    assert listed["beta"].weight_bytes > listed["alpha"].weight_bytes > 0
    meta = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(encoder_server["server"].address)).ModelMetadata(
        v2.ModelMetadataRequest(name=""))
    assert '"gamma"' in meta.parameters["adapters"].string_param


def test_interleaved_concurrent_infer_matches_peft(encoder_server):
    """Requests for three adapters and the base in flight together; each answer equals its PeftModel."""
    tok, refs = encoder_server["tok"], encoder_server["refs"]
    for name in ("beta", "gamma"):
        ensure_loaded(encoder_server, name)
    names = ["alpha", "", "beta", "gamma"]
    jobs = []
    for i in range(24):
        texts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3)]
        jobs.append((names[i % 4], *infer_request(tok, texts, names[i % 4])))

    async def run_all():
        async with grpc.aio.insecure_channel(encoder_server["server"].address) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(stub.ModelInfer(request) for _, request, _ in jobs))

    responses = asyncio.run(run_all())
    mixed = 0
    for (name, _, enc), response in zip(jobs, responses, strict=True):
        np.testing.assert_allclose(logits_of(response), expected_logits(refs[name], enc), atol=1e-4, rtol=1e-4)
        mixed += response.parameters["batch_size"].int64_param > len(enc["input_ids"])
    assert mixed > 0  # some requests shared a forward pass with other requests
    # and the adapters do change the answers
    base_logits = expected_logits(refs[""], jobs[0][2])
    assert np.abs(logits_of(responses[0]) - base_logits).max() > 1e-3


def test_unknown_adapter_is_not_found(encoder_server):
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(encoder_server["server"].address))
    request, _ = infer_request(encoder_server["tok"], ["hello"], "nobody")
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request)
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in excinfo.value.details()


def test_incompatible_adapter_refused_and_server_keeps_serving(encoder_server):
    address = encoder_server["server"].address
    stub = adapters_stub(address)
    gpt2, _ = mf.build_gpt2()
    wrong_targets = ah.save_lora(gpt2, encoder_server["root"] / "gpt2_lora", 3, 2, ["c_attn"])
    from peft import IA3Config, get_peft_model
    ia3 = encoder_server["root"] / "ia3"
    get_peft_model(copy.deepcopy(encoder_server["base"]), IA3Config(target_modules=["query"],
                                                                     feedforward_modules=[])).save_pretrained(ia3)
    for path, code in [(wrong_targets, grpc.StatusCode.INVALID_ARGUMENT),
                       (ia3, grpc.StatusCode.FAILED_PRECONDITION),
                       (encoder_server["root"] / "missing", grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="bad", path=str(path)), metadata=GOOD)
        assert excinfo.value.code() == code, excinfo.value.details()
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="bad"), metadata=GOOD)
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    assert "bad" not in [a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters]
    request, enc = infer_request(encoder_server["tok"], SENTENCES[:3], "alpha")
    response = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address)).ModelInfer(request)
    np.testing.assert_allclose(logits_of(response), expected_logits(encoder_server["refs"]["alpha"], enc),
                               atol=1e-4, rtol=1e-4)


def test_unload_then_requests_are_not_found_and_base_is_back(encoder_server):
    address = encoder_server["server"].address
    stub = adapters_stub(address)
    stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="temp", path=str(encoder_server["dirs"]["beta"])),
                     metadata=GOOD)
    unloaded = stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="temp"), metadata=GOOD).unloaded
    assert unloaded.name == "temp" and unloaded.rank == 4
    infer = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as excinfo:
        infer.ModelInfer(infer_request(encoder_server["tok"], ["hello"], "temp")[0])
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
    request, enc = infer_request(encoder_server["tok"], SENTENCES)
    np.testing.assert_allclose(logits_of(infer.ModelInfer(request)), expected_logits(encoder_server["base"], enc),
                               atol=1e-5, rtol=1e-5)


def greedy_reference(model, prompt_ids, n):
    """Plain greedy decoding without a cache: the textbook answer."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_interleaved_concurrent_generation_matches_peft(gpt2_server):
    tok, refs = gpt2_server["tok"], gpt2_server["refs"]
    names = ["alpha", "", "beta", "gamma"]
    jobs = [(names[i % 4], tok(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(12)]

    async def generate(stub, name, ids):
        settings = generation_pb2.GenerationSettings(max_new_tokens=8, ignore_eos=True, do_sample=False)
        request = generation_pb2.GenerateRequest(input_ids=ids, adapter=name, settings=settings)
        tokens = []
        async for step in stub.Generate(request):
            tokens += list(step.token_ids)
        return tokens

    async def run_all():
        async with grpc.aio.insecure_channel(gpt2_server["server"].address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            return await asyncio.gather(*(generate(stub, name, ids) for name, ids in jobs))

    results = asyncio.run(run_all())
    for (name, ids), tokens in zip(jobs, results, strict=True):
        assert tokens == greedy_reference(refs[name], ids, 8), name
    # the adapters change what is generated, so the equality above is a real check
    changed = [tokens != greedy_reference(refs[""], ids, 8) for (name, ids), tokens in zip(jobs, results, strict=True)
               if name]
    assert sum(changed) >= len(changed) - 1


def test_generation_unknown_adapter_is_not_found(gpt2_server):
    stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(gpt2_server["server"].address))
    request = generation_pb2.GenerateRequest(input_ids=[1, 2, 3], adapter="nobody")
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.Generate(request))
    assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


def test_management_needs_the_token(gpt2_server):
    stub = adapters_stub(gpt2_server["server"].address)
    load = adapters_pb2.LoadAdapterRequest(name="again", path=str(gpt2_server["dirs"]["alpha"]))
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.LoadAdapter(load, metadata=metadata)
        assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.LoadAdapter(load, metadata=GOOD).name == "again"
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="again"))
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    own_header = (("x-adapter-token", TOKEN),)  # how it travels when --auth-token holds `authorization`
    assert stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="again"),
                              metadata=own_header).unloaded.name == "again"
    # listing stays open
    assert sorted(a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters) == [
        "alpha", "beta", "gamma"]


def test_sdk_adapters_client_lists_loads_and_unloads_with_the_token(gpt2_server):
    import asyncio

    from client.adapters_client import AdaptersClient, AsyncAdaptersClient

    address, alpha = gpt2_server["server"].address, gpt2_server["dirs"]["alpha"]
    with AdaptersClient(address) as anonymous:
        assert sorted(a.name for a in anonymous.list()) == ["alpha", "beta", "gamma"]
        with pytest.raises(grpc.RpcError) as excinfo:
            anonymous.load("sdk", alpha)
        assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with AdaptersClient(address, token=TOKEN) as adapters:
        loaded = adapters.load("sdk", alpha)
        assert (loaded.name, loaded.method, loaded.rank) == ("sdk", "LORA", GPT2_RANKS["alpha"])
        assert loaded.target_modules == ["c_attn"] and loaded.weight_bytes > 0 and loaded.source == str(alpha)
        assert "sdk" in [a.name for a in adapters.list()]
        assert adapters.unload("sdk").name == "sdk"
        with pytest.raises(grpc.RpcError) as excinfo:
            adapters.unload("sdk")
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND

    async def use_async():
        async with AsyncAdaptersClient(address, token=TOKEN, header="x-adapter-token") as adapters:
            await adapters.load("sdk-async", alpha)
            names = [a.name for a in await adapters.list()]
            return names, (await adapters.unload("sdk-async")).name

    names, unloaded = asyncio.run(use_async())
    assert "sdk-async" in names and unloaded == "sdk-async"


def test_management_is_disabled_by_default(tmp_path):
    base, tok = mf.build_encoder("text-classification")
    model_dir = mf.save_components(tmp_path / "model", base, tok, "text-classification")
    alpha = ah.save_lora(base, tmp_path / "alpha", *ah.ENCODER_ADAPTERS["alpha"])
    with servers.model_service(model_dir, *SERVER_ARGS, "--adapter", f"alpha={alpha}") as server:
        stub = adapters_stub(server.address)
        for metadata in [(), (("authorization", "Bearer anything"),)]:
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="beta", path=str(alpha)), metadata=metadata)
            assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="alpha"), metadata=metadata)
            assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # the adapter named at start still serves requests
        request, enc = infer_request(tok, SENTENCES[:2], "alpha")
        response = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address)).ModelInfer(request)
        reference = ah.reference_models(base, {"alpha": alpha})["alpha"]
        np.testing.assert_allclose(logits_of(response), expected_logits(reference, enc), atol=1e-4, rtol=1e-4)


def test_token_mode_without_a_token_refuses_to_start(tmp_path):
    with servers.model_service(tmp_path, "--adapter-management", "token", wait=False) as server:
        assert server.proc.wait(60) != 0
        assert "needs a token" in server.log()


def test_adapter_through_preproc_and_client(encoder_server):
    """The client's `adapter` goes through preproc_service to model_service: labels and scores
    equal softmax of the in-process PeftModel's logits for that adapter."""
    from client.preproc_client import PreprocClient

    model_dir = encoder_server["root"] / "model"
    texts = SENTENCES[:3]
    ensure_loaded(encoder_server, "gamma")
    id2label = encoder_server["base"].config.id2label
    with servers.preproc_service(model_dir, encoder_server["server"].address, "--metrics-port", "0") as preproc:
        with PreprocClient(preproc.address) as client:
            for name in ["alpha", "", "gamma"]:
                results = client.classify(texts, top_k=len(id2label), adapter=name)
                _, enc = infer_request(encoder_server["tok"], texts)
                probs = torch.softmax(torch.from_numpy(expected_logits(encoder_server["refs"][name], enc)), -1)
                for row, expected in zip(results, probs, strict=True):
                    got = {ls.label: ls.score for ls in row}
                    want = {id2label[i]: float(p) for i, p in enumerate(expected)}
                    assert got.keys() == want.keys()
                    for label in want:
                        assert abs(got[label] - want[label]) < 1e-4, (name, label)
            with pytest.raises(grpc.RpcError) as excinfo:
                client.classify(texts, adapter="nobody")
            assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND


async def _refused_once_unloading(gen, probe):
    """Probe until a new request for the adapter is refused (the unload may reach the server a
    while after it was sent on a loaded machine: a fixed 0.05 s once was not enough)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            async for _ in gen.Generate(probe, timeout=30):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        assert asyncio.get_running_loop().time() < deadline, "a request for beta still admitted 30 s " \
            "after its unload was asked for"
        await asyncio.sleep(0.02)


def test_unload_waits_for_a_generation_in_flight(gpt2_server):
    """UnloadAdapter during a stream that uses the adapter: new requests for it are refused at once,
    the stream still finishes with the adapter's tokens, then the adapter is gone (and loaded back)."""
    tok, address = gpt2_server["tok"], gpt2_server["server"].address
    ids = tok("the river")["input_ids"]

    async def scenario():
        async with grpc.aio.insecure_channel(address) as channel:
            gen = generation_pb2_grpc.GenerationStub(channel)
            adapters = adapters_pb2_grpc.AdaptersStub(channel)
            settings = generation_pb2.GenerationSettings(max_new_tokens=64, ignore_eos=True, do_sample=False)
            request = generation_pb2.GenerateRequest(input_ids=ids, adapter="beta", settings=settings)
            probe = generation_pb2.GenerateRequest(input_ids=ids, adapter="beta", settings=generation_pb2.
                                                   GenerationSettings(max_new_tokens=1, do_sample=False))
            tokens, unload, probe_code = [], None, None
            async for step in gen.Generate(request, timeout=120):
                tokens += list(step.token_ids)
                if unload is None:  # the stream holds the adapter now: ask for the unload
                    unload = asyncio.ensure_future(adapters.UnloadAdapter(
                        adapters_pb2.UnloadAdapterRequest(name="beta"), metadata=GOOD, timeout=120))
                    probe_code = await _refused_once_unloading(gen, probe)
            return tokens, await unload, probe_code

    tokens, reply, probe_code = asyncio.run(scenario())
    assert probe_code == grpc.StatusCode.NOT_FOUND  # unloading: new requests are refused
    assert reply.unloaded.name == "beta"
    assert tokens == greedy_reference(gpt2_server["refs"]["beta"], ids, 64)  # the stream kept its adapter
    stub = adapters_stub(address)
    assert "beta" not in [a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters]
    stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="beta", path=str(gpt2_server["dirs"]["beta"])),
                     metadata=GOOD)
