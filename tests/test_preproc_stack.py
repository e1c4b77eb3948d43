"""preproc_service as a whole: the real MiniLM model, no torch in its process, the model service
going away and coming back, and the handshake refusing a model that does not match."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from client.preproc_client import AsyncPreprocClient, PreprocClient
from tests import model_factory, servers
from tests import preproc_helpers as h

# Runs preproc_service where torch cannot be imported: a meta_path finder in front of the real
# ones hides torch (import torch -> ModuleNotFoundError, find_spec("torch") -> None, no torch
# distribution), as on a CPU node without torch installed.
NO_TORCH_LAUNCHER = '''
import importlib.util
import sys

from preproc_service.torch_guard import hide_torch

hide_torch()
assert importlib.util.find_spec("torch") is None
try:
    import torch  # noqa: F401
except ImportError:
    print("torch import blocked", flush=True)
else:
    raise SystemExit("torch import was not blocked")

from preproc_service.cli import main  # noqa: E402

code = main()
assert "torch" not in sys.modules, "preproc_service imported torch"
sys.exit(code)
'''

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_minilm_embeddings_equal_mean_pooling_in_process():
    from transformers import AutoModel, AutoTokenizer

    directory = model_factory.minilm_dir()
    texts = ["How do I cook rice?", "Rice is boiled in water for about 15 minutes.", "The stock market fell today."]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModel.from_pretrained(str(directory)).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    with h.stack(directory) as (_, preproc):
        with PreprocClient(preproc.address, timeout=60) as client:
            info = client.info()
            got = client.embed(texts)
            openai = client.embeddings(texts)
    assert info.task == "feature-extraction" and info.max_length == 256
    assert got.applied_parameters["pooling"] == "mean" and got.applied_parameters["normalize"] is True
    for g, w in zip(got, want, strict=True):
        assert g.shape == (384,)
        assert float(np.dot(g, w) / np.linalg.norm(g) / np.linalg.norm(w)) >= 0.99999
    assert openai["object"] == "list" and [d["index"] for d in openai["data"]] == [0, 1, 2]
    assert openai["usage"]["prompt_tokens"] == int(enc["attention_mask"].sum())
    for d, w in zip(openai["data"], want, strict=True):
        assert d["object"] == "embedding"
        assert float(np.dot(d["embedding"], w) / np.linalg.norm(d["embedding"])) >= 0.99999


@pytest.fixture(scope="module")
def tc_model(tmp_path_factory):
    return h.build_task_model(tmp_path_factory.mktemp("preproc_stack"), "text-classification", seed=7)


def test_no_torch_and_model_service_restart(tc_model, tmp_path):
    directory, model, tokenizer = tc_model
    want = h.pipeline("text-classification", model, tokenizer)(h.SENTENCES, top_k=2)
    (tmp_path / "no_torch_preproc.py").write_text(NO_TORCH_LAUNCHER)
    model_port = servers.free_port()
    model_address = f"127.0.0.1:{model_port}"
    env = {"PYTHONPATH": f"{tmp_path}:{servers.ROOT}"}
    with servers.model_service(directory, "--metrics-port", "0", port=model_port) as first_model, \
            servers.service("no_torch_preproc", ["--model-dir", str(directory), "--model-service", model_address,
                                                 "--metrics-port", "0"], env=env) as preproc, \
            PreprocClient(preproc.address, timeout=20) as client:
        assert "torch import blocked" in preproc.log()
        _assert_same(client.classify(h.SENTENCES, top_k=2), want)

        # The model service goes away while preproc keeps running: UNAVAILABLE naming its address.
        first_model.stop()
        with pytest.raises(grpc.RpcError) as exc:
            client.classify(h.SENTENCES[:1])
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert model_address in exc.value.details()

        # It comes back on the same address: preproc recovers by itself.
        with servers.model_service(directory, "--metrics-port", "0", port=model_port):
            deadline = time.monotonic() + 30
            while True:
                try:
                    got = client.classify(h.SENTENCES, top_k=2)
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                    assert time.monotonic() < deadline, "preproc did not recover"
                    time.sleep(0.3)
            _assert_same(got, want)
            # Calls pass as soon as the channel reconnects; health (NOT_SERVING when the restart outlasted
            # --model-unreachable-grace-seconds) follows at the handshake's next retry, a second later.
            servers.wait_for(lambda: servers.health_status(preproc.address) == SERVING, timeout=60,
                             what="preproc's health to come back to SERVING")
    assert preproc.proc.returncode == 0, preproc.log()  # drained and exited; torch never imported


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert [x.label for x in g] == [x["label"] for x in w]
        assert np.allclose([x.score for x in g], [x["score"] for x in w], atol=1e-4)


@pytest.fixture(scope="module")
def small_batch_stack(tc_model):
    """The text-classification model behind a model_service that takes at most 4 rows per request."""
    with h.stack(tc_model[0], model_args=("--max-batch-size", "4")) as (model_proc, preproc):
        yield model_proc, preproc


def test_handshake_refuses_a_mismatched_model(tc_model, small_batch_stack):
    directory = tc_model[0]
    model_proc, _ = small_batch_stack
    # Told to serve fill-mask against a text-classification model: stays NOT_SERVING, says why.
    with servers.preproc_service(directory, model_proc.address, "--metrics-port", "0", "--task", "fill-mask",
                                 wait=False) as wrong:
        deadline = time.monotonic() + 60
        while "task differs" not in wrong.log():
            assert time.monotonic() < deadline, wrong.log()
            assert wrong.proc.poll() is None, wrong.log()
            time.sleep(0.3)
        assert servers.health_status(wrong.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "NOT_SERVING" in wrong.log() and "text-classification" in wrong.log()


def test_async_client_answers_concurrent_calls(tc_model, small_batch_stack):
    import asyncio

    _, model, tokenizer = tc_model
    address = small_batch_stack[1].address

    async def many():
        async with AsyncPreprocClient(address, timeout=30) as client:
            return await asyncio.gather(*(client.classify([text]) for text in h.SENTENCES * 4))

    results = asyncio.run(many())
    want = h.pipeline("text-classification", model, tokenizer)(h.SENTENCES * 4)
    assert [r[0][0].label for r in results] == [w["label"] for w in want]
    assert np.allclose([r[0][0].score for r in results], [w["score"] for w in want], atol=1e-4)


def test_requests_over_the_model_batch_limit_are_sliced(tc_model, small_batch_stack):
    """model_service refuses requests over --max-batch-size rows (INVALID_ARGUMENT): preproc slices them."""
    _, model, tokenizer = tc_model
    texts = [f"{text} number {i}" for i, text in enumerate(h.SENTENCES * 2)]  # 10 texts
    with PreprocClient(small_batch_stack[1].address, timeout=60) as client:
        results = client.classify(texts, top_k=2)
    want = h.pipeline("text-classification", model, tokenizer)(texts, top_k=2)
    assert [[x.label for x in r] for r in results] == [[x["label"] for x in w] for w in want]
    assert np.allclose([[x.score for x in r] for r in results], [[x["score"] for x in w] for w in want], atol=1e-4)
