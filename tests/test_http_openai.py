"""preproc_service's OpenAI-compatible HTTP door, called with the official `openai` package.

The real pair runs on loopback (model_service + preproc_service with its HTTP port); answers over
HTTP must equal the gRPC API's answers to the same request (one set of handlers behind both doors),
and greedy answers and log-probabilities equal the in-process model's.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from splitserve_pb import preproc_pb2 as pb
from tests import servers
from tests.adapter_helpers import GPT2_ADAPTERS, reference_models, save_adapters
from tests.generation_helpers import BUILDERS, preproc_stub, reference_generate, save_generative
from tests.preproc_helpers import build_task_model

QUIET = ("--metrics-port", "0")
MESSAGES = [{"role": "user", "content": "the river of Paris"}]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    root = save_generative(base / "gpt2", "gpt2")
    model, tokenizer = BUILDERS["gpt2"]()
    adapter_dirs = save_adapters(model, base / "adapters", {"alpha": GPT2_ADAPTERS["alpha"]})
    with servers.model_service(root, "--adapter", f"alpha={adapter_dirs['alpha']}", *QUIET) as ms, \
            servers.preproc_service(root, ms.address, *QUIET) as pp:
        client = openai.OpenAI(base_url=pp.http_url + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        yield {"client": client, "name": name, "grpc": preproc_stub(pp.address), "model": model,
               "tokenizer": tokenizer, "adapter_dirs": adapter_dirs, "url": pp.http_url}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    root, _model, _tok = build_task_model(tmp_path_factory.mktemp("http"), "feature-extraction")
    with servers.model_service(root, *QUIET) as ms, \
            servers.preproc_service(root, ms.address, *QUIET, "--auth-token", TOKEN) as pp:
        yield {"url": pp.http_url, "grpc": pp.address,
               "client": openai.OpenAI(base_url=pp.http_url + "/v1", api_key=TOKEN, max_retries=0)}


def _chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_equals_grpc_and_model_generate(gpt2):
    client, tok = gpt2["client"], gpt2["tokenizer"]
    answer = client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_tokens=12)
    grpc_answer = gpt2["grpc"].Chat(pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in MESSAGES], max_tokens=12))
    expected_ids = reference_generate(gpt2["model"], tok, _chat_ids(tok, MESSAGES), max_new_tokens=12,
                                      do_sample=False)
    assert answer.object == "chat.completion" and answer.model == gpt2["name"]
    assert answer.choices[0].message.content == grpc_answer.choices[0].message.content
    assert answer.choices[0].message.content == tok.decode(expected_ids, skip_special_tokens=True)
    assert answer.choices[0].finish_reason == grpc_answer.choices[0].finish_reason
    assert answer.choices[0].logprobs is None
    assert answer.usage.completion_tokens == len(expected_ids)
    assert answer.usage.prompt_tokens == len(_chat_ids(tok, MESSAGES))


def test_chat_stream_adds_up_and_reports_usage(gpt2):
    client = gpt2["client"]
    whole = client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_tokens=10)
    chunks = list(client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    # include_usage: usage null on every chunk but a last one with no choices.
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done_and_has_no_usage_unless_asked(gpt2):
    body = {"model": gpt2["name"], "prompt": "the river", "max_tokens": 5, "stream": True}
    request = urllib.request.Request(gpt2["url"] + "/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line[len(b"data: "):] for line in reply.read().split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[0]["choices"][0]["logprobs"] is None and chunks[0]["system_fingerprint"] is None


def test_completions_streamed_and_not_equal_grpc(gpt2):
    client = gpt2["client"]
    answer = client.completions.create(model=gpt2["name"], prompt="Alice walk to the market", max_tokens=9)
    grpc_answer = gpt2["grpc"].Complete(pb.CompletionRequest(prompt="Alice walk to the market", max_tokens=9))
    assert answer.object == "text_completion"
    assert answer.choices[0].text == grpc_answer.choices[0].text
    streamed = list(client.completions.create(model=gpt2["name"], prompt="Alice walk to the market", max_tokens=9,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    assert answer.usage.completion_tokens == grpc_answer.usage.completion_tokens


def test_n_choices_with_seed(gpt2):
    client = gpt2["client"]
    kwargs = dict(model=gpt2["name"], messages=MESSAGES, max_tokens=8, n=2, temperature=1.5, seed=7)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert texts[0] != texts[1]  # choice i samples with seed + i
    assert first.usage.completion_tokens == 16  # both choices counted (8 tokens each, no eos in 8 steps)
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    for index in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in streamed
                       if c.choices and c.choices[0].index == index) == texts[index]
    greedy = client.completions.create(model=gpt2["name"], prompt="why", max_tokens=6, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_chat_logprobs_equal_the_models(gpt2):
    import torch

    client, tok, model = gpt2["client"], gpt2["tokenizer"], gpt2["model"]
    answer = client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_tokens=6, logprobs=True,
                                            top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    ids = _chat_ids(tok, MESSAGES)
    generated = reference_generate(model, tok, ids, max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + generated])).logits[0]
    expected = logits.log_softmax(-1)[len(ids) - 1:len(ids) - 1 + len(generated)]
    for step, (entry, token) in enumerate(zip(content, generated, strict=True)):
        assert entry.token == tok.decode([token])
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: top-1 chosen
        top3 = torch.topk(expected[step], 3).indices.tolist()
        assert [t.token for t in entry.top_logprobs] == [tok.decode([t]) for t in top3]


def test_completion_logprobs_legacy_shape(gpt2):
    answer = gpt2["client"].completions.create(model=gpt2["name"], prompt="the river", max_tokens=4, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == len("the river")


def _greedy_with_penalties(model, ids, steps, presence, frequency):
    """In-process greedy decoding with OpenAI's penalties over the generated tokens: the reference."""
    import torch

    generated = []
    for _ in range(steps):
        with torch.inference_mode():
            logits = model(torch.tensor([ids + generated])).logits[0, -1].float()
        logits = logits.clone()
        for token in set(generated):
            logits[token] -= generated.count(token) * frequency + presence
        generated.append(int(logits.argmax()))
    return generated


def test_presence_and_frequency_penalties(gpt2):
    tok, model = gpt2["tokenizer"], gpt2["model"]
    prompt = "the the the river"
    ids = tok(prompt)["input_ids"]
    plain = _greedy_with_penalties(model, ids, 10, 0.0, 0.0)
    penalized = _greedy_with_penalties(model, ids, 10, 1.5, 2.0)
    assert plain != penalized  # the model repeats itself without them, so they must change the answer
    answer = gpt2["grpc"].Complete(pb.CompletionRequest(prompt=prompt, max_tokens=10, presence_penalty=1.5,
                                                        frequency_penalty=2.0))
    http = gpt2["client"].completions.create(model=gpt2["name"], prompt=prompt, max_tokens=10,
                                             presence_penalty=1.5, frequency_penalty=2.0)
    eos = tok.eos_token_id
    cut = penalized[:penalized.index(eos)] if eos in penalized else penalized
    assert http.choices[0].text == answer.choices[0].text == tok.decode(cut, skip_special_tokens=True)


def test_stop_and_max_completion_tokens(gpt2):
    client = gpt2["client"]
    full = client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_completion_tokens=7)
    assert full.usage.completion_tokens == 7 and full.choices[0].finish_reason == "length"
    text = full.choices[0].message.content
    stop = text[3:6]
    cut = client.chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_completion_tokens=7, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_adapter_named_as_model_answers(gpt2):
    client = gpt2["client"]
    assert {m.id for m in client.models.list().data} == {gpt2["name"], "alpha"}
    answer = client.completions.create(model="alpha", prompt="the river of", max_tokens=8)
    grpc_answer = gpt2["grpc"].Complete(pb.CompletionRequest(prompt="the river of", max_tokens=8, adapter="alpha"))
    base = gpt2["grpc"].Complete(pb.CompletionRequest(prompt="the river of", max_tokens=8))
    assert answer.model == "alpha"
    assert answer.choices[0].text == grpc_answer.choices[0].text
    refs = reference_models(gpt2["model"], gpt2["adapter_dirs"])
    tok = gpt2["tokenizer"]
    expected = reference_generate(refs["alpha"], tok, tok("the river of")["input_ids"], max_new_tokens=8,
                                  do_sample=False)
    assert answer.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert answer.choices[0].text != base.choices[0].text


def test_unknown_model_is_404_model_not_found(gpt2):
    with pytest.raises(openai.NotFoundError) as caught:
        gpt2["client"].chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert "gpt-4o" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        gpt2["client"].models.retrieve("gpt-4o")


@pytest.mark.parametrize("kwargs, param", [
    ({"messages": []}, "messages"),
    ({"messages": MESSAGES, "temperature": 5}, "temperature"),
    ({"messages": MESSAGES, "n": 99}, None),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MESSAGES, "top_logprobs": 2}, None),
])
def test_bad_input_is_400_with_openai_error(gpt2, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        gpt2["client"].chat.completions.create(model=gpt2["name"], **kwargs)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param:
        assert error["param"] == param
    # The service keeps serving.
    assert gpt2["client"].chat.completions.create(model=gpt2["name"], messages=MESSAGES, max_tokens=2).choices


def test_streamed_bad_request_gets_its_status_before_the_stream(gpt2):
    with pytest.raises(openai.BadRequestError) as caught:
        gpt2["client"].completions.create(model=gpt2["name"], prompt="x", max_tokens=100000, stream=True)
    assert "max_new_tokens" in caught.value.message


def test_embeddings_float_base64_and_dimensions(embedder):
    client = embedder["client"]
    texts = ["Alice walked to the river in Paris.", "the old market"]
    answer = client.embeddings.create(model=client.models.list().data[0].id, input=texts)
    stub = preproc_stub(embedder["grpc"])
    grpc_answer = stub.Embeddings(pb.EmbeddingsRequest(input=texts), metadata=[("authorization", f"Bearer {TOKEN}")])
    assert [d.index for d in answer.data] == [0, 1]
    for got, want in zip(answer.data, grpc_answer.data, strict=True):
        np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-6)
    assert answer.usage.prompt_tokens == grpc_answer.usage.prompt_tokens
    # base64: the same float32 values, little-endian.
    raw = client.embeddings.with_raw_response.create(model=answer.model, input=texts, encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), "<f4"),
                                  np.asarray(answer.data[0].embedding, np.float32))
    full = len(answer.data[0].embedding)
    assert len(client.embeddings.create(model=answer.model, input=texts, dimensions=full).data[0].embedding) == full
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=answer.model, input=texts, dimensions=8)
    assert "matryoshka" in caught.value.message


def test_token_required_on_http(embedder):
    wrong = openai.OpenAI(base_url=embedder["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.embeddings.create(model="x", input=["a"])
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
    # MLflow's door takes the same token and answers in MLflow's error shape; probes need none.
    request = urllib.request.Request(embedder["url"] + "/invocations", b'{"inputs": ["a"]}',
                                     {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and json.loads(refused.value.read())["error_code"] == "UNAUTHENTICATED"
    request.add_header("authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert len(json.loads(reply.read())["predictions"][0]) == 32  # hidden size of the tiny encoder
    for probe in ("/health", "/ping"):
        with urllib.request.urlopen(embedder["url"] + probe, timeout=10) as reply:
            assert reply.status == 200


def test_request_id_and_metrics_protocol_label(tmp_path):
    from tests.ops_helpers import sample

    root, _model, _tok = build_task_model(tmp_path, "feature-extraction")
    metrics_port = servers.free_port()
    with servers.model_service(root, *QUIET) as ms, \
            servers.preproc_service(root, ms.address, "--metrics-port", str(metrics_port)) as pp:
        body = json.dumps({"input": ["a b"]}).encode()
        request = urllib.request.Request(pp.http_url + "/v1/embeddings", body,
                                         {"content-type": "application/json", "x-request-id": "req-42"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.headers["x-request-id"] == "req-42"
        # The same id on the access lines of both services (sent on with preproc's model call); the HTTP
        # access line is written once the response has been sent, so it may follow the reply.
        servers.wait_for(lambda: "POST /v1/embeddings 200" in pp.log() and "request_id=req-42" in pp.log(),
                         timeout=10, what="preproc's HTTP access line")
        servers.wait_for(lambda: "request_id=req-42" in ms.log(), timeout=10, what="model_service's access line")
        bad = urllib.request.Request(pp.http_url + "/v1/embeddings", b"{not json", {"content-type": "x"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(bad, timeout=30)
        assert caught.value.code == 400 and caught.value.headers["x-request-id"]
        preproc_stub(pp.address).Embeddings(pb.EmbeddingsRequest(input=["a b"]))
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    route = "POST /v1/embeddings"
    assert sample(text, "splitserve_requests_total", protocol="http", method=route, code="200") == 1
    assert sample(text, "splitserve_requests_total", protocol="http", method=route, code="400") == 1
    assert sample(text, "splitserve_requests_total", protocol="grpc", method="splitserve.v1.Preproc/Embeddings",
                  code="OK") == 1
