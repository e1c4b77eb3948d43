"""Generation through the real pair (model_service + preproc_service subprocesses on loopback):
greedy answers equal in-process model.generate token for token, streams add up to the
non-streamed answers, OpenAI shapes and usage, settings precedence, and clear statuses."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from splitserve_pb import generation_pb2 as gpb
from splitserve_pb import preproc_pb2 as pb
from tests import servers
from tests.adapter_helpers import GPT2_ADAPTERS, reference_models, save_adapters
from tests.generation_helpers import BUILDERS, generation_stub, preproc_stub, reference_generate, save_generative

PROMPTS = ["the river of", "Alice walk to the market in Paris with a friend and", "東京 🙂 music", "why"]
QUIET = ("--metrics-port", "0")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    root = save_generative(base / "gpt2", "gpt2")
    model, tokenizer = BUILDERS["gpt2"]()
    # Two PEFT adapters loaded at start, for generation with per-request adapters.
    adapter_dirs = save_adapters(model, base / "adapters", {k: GPT2_ADAPTERS[k] for k in ("alpha", "gamma")})
    adapter_flags = [f for name, path in adapter_dirs.items() for f in ("--adapter", f"{name}={path}")]
    with servers.model_service(root, *adapter_flags, *QUIET) as ms, \
            servers.preproc_service(root, ms.address, *QUIET) as pp:
        yield {"root": root, "model": model, "tokenizer": tokenizer, "gen": generation_stub(ms.address),
               "adapter_dirs": adapter_dirs,
               "pre": preproc_stub(pp.address), "model_address": ms.address, "pre_address": pp.address}


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = save_generative(tmp_path_factory.mktemp("gen") / "t5", "t5")
    model, tokenizer = BUILDERS["t5"]()
    with servers.model_service(root, *QUIET) as ms, servers.preproc_service(root, ms.address, *QUIET) as pp:
        yield {"model": model, "tokenizer": tokenizer, "gen": generation_stub(ms.address),
               "pre": preproc_stub(pp.address)}


def generate_ids(stub, ids, adapter="", **settings):
    steps = list(stub.Generate(gpb.GenerateRequest(input_ids=ids, adapter=adapter,
                                                   settings=gpb.GenerationSettings(**settings))))
    tokens = [t for step in steps for t in step.token_ids]
    return tokens, steps[-1]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_greedy_generation_api_equals_model_generate(kind, request):
    env = request.getfixturevalue(kind)
    tok, model = env["tokenizer"], env["model"]
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    lengths = [20, 7, 13, 30]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent streams share the running batch
        results = list(pool.map(lambda a: generate_ids(env["gen"], a[0], max_new_tokens=a[1]),
                                zip(prompt_ids, lengths, strict=True)))
    for (tokens, last), ids, n in zip(results, prompt_ids, lengths, strict=True):
        expected = reference_generate(model, tok, ids, max_new_tokens=n, do_sample=False)
        assert tokens == expected
        assert last.generated_tokens == len(tokens) and last.prompt_tokens == len(ids)
        eos_end = tokens[-1] == tok.eos_token_id and len(tokens) < n
        assert last.finish_reason == (gpb.FINISH_REASON_EOS if eos_end else gpb.FINISH_REASON_LENGTH)


def test_generate_text_equals_in_process_and_stream_equals_unary(gpt2):
    tok = gpt2["tokenizer"]
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        expected = tok.decode(reference_generate(gpt2["model"], tok, ids, max_new_tokens=25, do_sample=False),
                              skip_special_tokens=True)
        params = pb.GenerateTextParameters(max_new_tokens=25, return_full_text=False)
        unary = gpt2["pre"].GenerateText(pb.GenerateTextRequest(prompt=prompt, parameters=params))
        chunks = list(gpt2["pre"].GenerateTextStream(pb.GenerateTextRequest(prompt=prompt, parameters=params)))
        assert unary.generated_text == expected
        assert "".join(c.text for c in chunks) == unary.generated_text
        assert len(chunks) > 1 and chunks[-1].finish_reason == unary.finish_reason
        assert unary.usage.prompt_tokens == len(ids)
        assert unary.usage.total_tokens == len(ids) + unary.usage.completion_tokens
        full = gpt2["pre"].GenerateText(pb.GenerateTextRequest(
            prompt=prompt, parameters=pb.GenerateTextParameters(max_new_tokens=25)))
        assert full.generated_text == prompt + expected  # return_full_text defaults to true


def test_text2text_equals_in_process(t5):
    tok = t5["tokenizer"]
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        expected = tok.decode(reference_generate(t5["model"], tok, ids, max_new_tokens=12, do_sample=False),
                              skip_special_tokens=True)
        request = pb.GenerateTextRequest(prompt=prompt, parameters=pb.GenerateTextParameters(max_new_tokens=12))
        assert t5["pre"].GenerateText(request).generated_text == expected
        assert "".join(c.text for c in t5["pre"].GenerateTextStream(request)) == expected


def test_chat_and_completions_are_openai_shaped(gpt2):
    tok, pre = gpt2["tokenizer"], gpt2["pre"]
    messages = [{"role": "user", "content": "Where is the river?"}]
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(templated, add_special_tokens=False)["input_ids"]
    expected = tok.decode(reference_generate(gpt2["model"], tok, ids, max_new_tokens=16, do_sample=False),
                          skip_special_tokens=True)
    request = pb.ChatRequest(messages=[pb.ChatMessage(**m) for m in messages], max_tokens=16)
    chat = pre.Chat(request)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.created > 0 and chat.model
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 16 if chat.choices[0].finish_reason
                                                                        == "length" else chat.usage.completion_tokens)
    chunks = list(pre.ChatStream(request))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason and chunks[-1].usage == chat.usage

    prompt_ids = tok("the river of")["input_ids"]
    expected = tok.decode(reference_generate(gpt2["model"], tok, prompt_ids, max_new_tokens=10, do_sample=False),
                          skip_special_tokens=True)
    completion = pre.Complete(pb.CompletionRequest(prompt="the river of", max_tokens=10))
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == expected and completion.usage.prompt_tokens == len(prompt_ids)
    chunks = list(pre.CompleteStream(pb.CompletionRequest(prompt="the river of", max_tokens=10)))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_same_seed_same_text(gpt2):
    def sample(seed):
        params = pb.GenerateTextParameters(max_new_tokens=20, do_sample=True, temperature=1.3, seed=seed,
                                           return_full_text=False)
        return gpt2["pre"].GenerateText(pb.GenerateTextRequest(prompt="the river", parameters=params)).generated_text

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_prompt_template_and_mlflow_keys(gpt2, tmp_path):
    """A second preproc on a copy of the directory whose MLmodel carries a prompt_template and model_config."""
    root = tmp_path / "templated"
    shutil.copytree(gpt2["root"], root)
    doc = yaml.safe_load((root / "MLmodel").read_text())
    doc["metadata"] = {"prompt_template": "Q: {prompt}\nA:"}
    # num_beams in model_config: served with beam search, not greedy without a word.
    doc["flavors"]["python_function"]["config"] = {"max_new_tokens": 9, "collapse_whitespace": True, "num_beams": 3}
    (root / "MLmodel").write_text(yaml.safe_dump(doc))
    tok = gpt2["tokenizer"]
    templated = "Q: where is the river\nA:"
    ids = tok(templated)["input_ids"]
    beams = reference_generate(gpt2["model"], tok, ids, max_new_tokens=9, do_sample=False, num_beams=3)
    assert beams != reference_generate(gpt2["model"], tok, ids, max_new_tokens=9, do_sample=False)
    expected = tok.decode(beams, skip_special_tokens=True)
    with servers.preproc_service(root, gpt2["model_address"], *QUIET) as pp:
        pre = preproc_stub(pp.address)
        plain = pre.GenerateText(pb.GenerateTextRequest(prompt="where is the river"))
        assert plain.generated_text == " ".join(expected.split())  # template applied, prompt left out, collapsed
        assert plain.usage.completion_tokens == len(beams) == 9  # model_config's max_new_tokens applied
        assert list(plain.token_ids) == beams and json.loads(plain.meta.applied_parameters["num_beams"]) == 3
        full = pre.GenerateText(pb.GenerateTextRequest(
            prompt="where is the river", parameters=pb.GenerateTextParameters(include_prompt=True)))
        assert full.generated_text == " ".join((templated + expected).split())


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_beam_search_equals_model_generate_through_both_services(kind, request):
    env = request.getfixturevalue(kind)
    tok, model = env["tokenizer"], env["model"]
    options = {"num_beams": 4, "length_penalty": 0.6, "early_stopping": True, "no_repeat_ngram_size": 2}
    ids = tok(PROMPTS[1])["input_ids"]
    expected = reference_generate(model, tok, ids, max_new_tokens=10, do_sample=False, **options)
    tokens, last = generate_ids(env["gen"], ids, max_new_tokens=10, **options)
    assert tokens == expected[: len(tokens)] and (tokens == expected or tokens[-1] == tok.eos_token_id)
    ended = tokens[-1] == tok.eos_token_id
    assert last.finish_reason == (gpb.FINISH_REASON_EOS if ended else gpb.FINISH_REASON_LENGTH)
    reply = env["pre"].GenerateText(pb.GenerateTextRequest(prompt=PROMPTS[0], parameters=pb.GenerateTextParameters(
        max_new_tokens=10, **options)))
    ids = tok(PROMPTS[0])["input_ids"]
    expected = reference_generate(model, tok, ids, max_new_tokens=10, do_sample=False, **options)
    assert list(reply.token_ids) == expected[: len(reply.token_ids)] and reply.token_ids
    assert {k: json.loads(v) for k, v in reply.meta.applied_parameters.items() if k in options} == options
    chunks = list(env["pre"].GenerateTextStream(pb.GenerateTextRequest(
        prompt=PROMPTS[0], parameters=pb.GenerateTextParameters(max_new_tokens=10, return_full_text=False,
                                                                **options))))
    assert "".join(c.text for c in chunks) == tok.decode(list(reply.token_ids), skip_special_tokens=True)


@pytest.mark.parametrize("parameters, words", [
    ({"num_return_sequences": 2}, "num_return_sequences=2 is not supported"),
    ({"length_penalty": 2.0}, "length_penalty applies to beam search only"),
    ({"num_beams": 2, "do_sample": True}, "do_sample with num_beams > 1"),
    ({"num_beams": 99}, "--gen-max-beams"),
])
def test_generation_options_that_cannot_be_honoured_are_refused_by_name(gpt2, parameters, words):
    code, details = _code(lambda: gpt2["pre"].GenerateText(pb.GenerateTextRequest(
        prompt="the river", parameters=pb.GenerateTextParameters(**parameters))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details
    assert generate_ids(gpt2["gen"], [5, 6, 7], max_new_tokens=2)[0]  # still serving


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.GenerateTextResponse | pb.ChatCompletion):
            list(result)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("settings, words", [
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
    ({"max_new_tokens": 5000}, "context"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_settings_give_invalid_argument_on_both_services(gpt2, settings, words):
    code, details = _code(lambda: gpt2["gen"].Generate(gpb.GenerateRequest(
        input_ids=[5, 6], settings=gpb.GenerationSettings(**settings))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details
    code, details = _code(lambda: gpt2["pre"].GenerateText(pb.GenerateTextRequest(
        prompt="the river", parameters=pb.GenerateTextParameters(**settings))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details


def test_bad_requests_give_clear_statuses_and_service_keeps_serving(gpt2, t5):
    cases = [
        (lambda: gpt2["gen"].Generate(gpb.GenerateRequest()), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (lambda: gpt2["gen"].Generate(gpb.GenerateRequest(input_ids=[10 ** 6])), grpc.StatusCode.INVALID_ARGUMENT,
         "vocabulary"),
        (lambda: gpt2["pre"].GenerateText(pb.GenerateTextRequest(prompt="")), grpc.StatusCode.INVALID_ARGUMENT,
         "empty"),
        (lambda: gpt2["pre"].Chat(pb.ChatRequest()), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (lambda: gpt2["pre"].Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], n=99)),
         grpc.StatusCode.INVALID_ARGUMENT, "--max-choices"),
        (lambda: gpt2["pre"].Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")],
                                                 model="gpt-4o")), grpc.StatusCode.NOT_FOUND, "gpt-4o"),
        (lambda: gpt2["pre"].Complete(pb.CompletionRequest(prompt="hi", presence_penalty=3.0)),
         grpc.StatusCode.INVALID_ARGUMENT, "presence_penalty"),
        (lambda: gpt2["pre"].GenerateText(pb.GenerateTextRequest(
            prompt="x", parameters=pb.GenerateTextParameters(stop=[""]))), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (lambda: t5["pre"].Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")])),
         grpc.StatusCode.FAILED_PRECONDITION, "chat template"),
    ]
    for call, code, words in cases:
        got, details = _code(call)
        assert got == code and words in details, (got, details)
    tokens, _ = generate_ids(gpt2["gen"], [5, 6, 7], max_new_tokens=3)
    assert len(tokens) == 3
    stats = gpt2["gen"].Stats(gpb.GenerationStatsRequest())
    assert stats.active_sequences == 0 and stats.waiting_sequences == 0


def test_clients_and_cli_stream_and_answer(gpt2):
    import asyncio
    import json
    import subprocess
    import sys

    from client.generation_client import AsyncGenerationClient, GenerationClient
    from tests.servers import ROOT

    address = gpt2["pre_address"]
    with GenerationClient(address) as client:
        answer = client.generate("the river of", max_new_tokens=12, return_full_text=False)
        stream = client.generate_stream("the river of", max_new_tokens=12, return_full_text=False)
        pieces = list(stream)
        assert len(pieces) > 1 and "".join(pieces) == answer.text == stream.result.text
        assert stream.result.finish_reason == answer.finish_reason
        assert (stream.result.prompt_tokens, stream.result.completion_tokens) == (answer.prompt_tokens, 12)
        chat = client.chat([{"role": "user", "content": "hi"}], max_tokens=6)
        chat_stream = client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=6)
        assert "".join(chat_stream) == chat.text and chat_stream.result.id.startswith("chatcmpl-")

    async def run_async():
        async with AsyncGenerationClient(address) as client:
            stream = client.complete_stream("the river of", max_tokens=8)
            pieces = [p async for p in stream]
            answer = await client.complete("the river of", max_tokens=8)
            return pieces, stream.result, answer

    pieces, result, completion = asyncio.run(run_async())
    assert "".join(pieces) == completion.text == result.text and result.completion_tokens == 8

    cli = [sys.executable, "-m", "client", "--address", address]
    out = subprocess.run([*cli, "generate", "--max-new-tokens", "12", "--no-full-text", "the river of"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == answer.text + "\n"  # the text alone on stdout; the summary on stderr
    assert json.loads(out.stderr)["usage"]["completion_tokens"] == 12
    out = subprocess.run([*cli, "chat", "--no-stream", "--max-tokens", "6", "hi"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["text"] == chat.text and out.stdout.count("\n") == 1


def test_generation_results_carry_token_ids_logprobs_and_applied_parameters(gpt2):
    from client.generation_client import GenerationClient

    tok, model = gpt2["tokenizer"], gpt2["model"]
    want = reference_generate(model, tok, tok("the river of")["input_ids"], max_new_tokens=6, do_sample=False)
    with GenerationClient(gpt2["pre_address"]) as client:
        answer = client.generate("the river of", max_new_tokens=6, logprobs=True, return_full_text=False)
        stream = client.generate_stream("the river of", max_new_tokens=6, logprobs=True, return_full_text=False)
        assert "".join(stream) == answer.text
    for result in (answer, stream.result):
        assert result.token_ids == want and len(result.logprobs) == 6 and all(lp <= 0 for lp in result.logprobs)
        assert result.applied_parameters == {"max_new_tokens": 6, "return_full_text": False}
    assert stream.result.logprobs == pytest.approx(answer.logprobs)


def test_cli_prints_no_prompt_before_an_error_and_names_the_generation_commands(gpt2):
    import subprocess
    import sys

    from tests.servers import ROOT

    cli = [sys.executable, "-m", "client", "--address", gpt2["pre_address"]]
    refused = subprocess.run([*cli, "generate", "--full-text", "--max-new-tokens", "5000", "the river of"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 1 and refused.stdout == ""
    error = json.loads(refused.stderr)["error"]
    assert error["code"] == "INVALID_ARGUMENT" and "context" in error["message"]
    predicted = subprocess.run([*cli, "predict", "the river of"], capture_output=True, text=True, cwd=ROOT,
                               timeout=120)
    assert predicted.returncode == 2 and predicted.stdout == ""
    message = json.loads(predicted.stderr)["error"]["message"]
    assert "`splitserve generate`" in message and "`splitserve chat`" in message
    full = subprocess.run([*cli, "generate", "--full-text", "--max-new-tokens", "4", "the river of"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert full.returncode == 0 and full.stdout.startswith("the river of")
    tok = gpt2["tokenizer"]
    beams = reference_generate(gpt2["model"], tok, tok("the river of")["input_ids"], max_new_tokens=6,
                               do_sample=False, num_beams=3, no_repeat_ngram_size=2)
    searched = subprocess.run([*cli, "generate", "--no-full-text", "--max-new-tokens", "6", "--num-beams", "3",
                               "--no-repeat-ngram-size", "2", "the river of"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    assert searched.returncode == 0, searched.stderr
    assert searched.stdout == tok.decode(beams, skip_special_tokens=True) + "\n"


def test_logprobs_match_in_process_scores(gpt2):
    import torch

    tok, model = gpt2["tokenizer"], gpt2["model"]
    ids = tok("the river of")["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    expected = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens, strict=True)]
    chunks = list(gpt2["pre"].GenerateTextStream(pb.GenerateTextRequest(prompt="the river of", parameters=pb.
                                                 GenerateTextParameters(max_new_tokens=8, logprobs=True))))
    assert [t for c in chunks for t in c.token_ids] == tokens
    assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(expected, abs=1e-4)


def test_adapters_mix_in_one_running_batch(gpt2):
    """Streams for the base model and two LoRA adapters share the batch; each equals its own PeftModel."""
    tok = gpt2["tokenizer"]
    references = reference_models(gpt2["model"], gpt2["adapter_dirs"])
    jobs = [(name, tok(prompt)["input_ids"]) for name in ("", "alpha", "gamma") for prompt in PROMPTS[:2]]

    def run(job):
        name, ids = job
        steps = gpt2["gen"].Generate(gpb.GenerateRequest(input_ids=ids, adapter=name,
                                                         settings=gpb.GenerationSettings(max_new_tokens=12)))
        return [t for step in steps for t in step.token_ids]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    outputs = {}
    for (name, ids), tokens in zip(jobs, results, strict=True):
        assert tokens == reference_generate(references[name], tok, ids, max_new_tokens=12, do_sample=False)
        outputs.setdefault(name, []).append(tokens)
    assert outputs[""] != outputs["alpha"] and outputs[""] != outputs["gamma"]  # the adapters matter
    code, details = _code(lambda: gpt2["gen"].Generate(gpb.GenerateRequest(input_ids=[5], adapter="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def test_mlflow_peft_generation_model_answers_with_its_own_adapter(tmp_path):
    """An MLflow PEFT text-generation model: requests naming no adapter get the fine-tuned model
    (its peft/ adapter, served under the model's name), `adapter: base` gets the base."""
    from tests import model_factory

    model, tok = BUILDERS["gpt2"]()
    peft_model = model_factory.build_lora(model, seed=4, task_type="CAUSAL_LM")
    root = model_factory.save_peft_components(tmp_path / "tuned", peft_model, tok, "text-generation",
                                              "TextGenerationPipeline")
    ids = tok(PROMPTS[1])["input_ids"]
    tuned = reference_generate(peft_model, tok, ids, max_new_tokens=12, do_sample=False)
    with peft_model.disable_adapter():
        base = reference_generate(peft_model, tok, ids, max_new_tokens=12, do_sample=False)
    assert tuned != base  # the adapter changes the answer
    with servers.model_service(root, *QUIET) as ms:
        stub = generation_stub(ms.address)
        assert generate_ids(stub, ids, max_new_tokens=12)[0] == tuned
        assert generate_ids(stub, ids, adapter="tuned", max_new_tokens=12)[0] == tuned
        assert generate_ids(stub, ids, adapter="base", max_new_tokens=12)[0] == base
