"""Streaming behaviour through the real pair, on real GPT-2 models whose weights are set so that
greedy decoding writes a known text (tests/generation_helpers.py): emoji and CJK never split
inside a character, stop strings spanning tokens cut the answer and stop the model, and a
cancelled stream frees its slot while the other streams go on unchanged."""

from __future__ import annotations

import itertools
import math
import threading

import grpc
import pytest

from splitserve_pb import generation_pb2 as gpb
from splitserve_pb import preproc_pb2 as pb
from tests import model_factory as mf
from tests import servers
from tests.generation_helpers import generation_stub, positional_gpt2, preproc_stub

PROMPT = "Say:"
SCRIPT_TEXT = " 東京 は 🙂 日本 の 首都 👍🏽 你好 and then END of river"
FILLER = " river"  # what the model writes after the script, until max_new_tokens
QUIET = ("--metrics-port", "0")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    tok = mf.bytelevel_bpe_tokenizer()
    prompt_ids = tok(PROMPT)["input_ids"]
    script = tok(SCRIPT_TEXT, add_special_tokens=False)["input_ids"]
    filler = tok(FILLER, add_special_tokens=False)["input_ids"]
    assert len(filler) == 1
    n_positions = 1024
    sequence = script + filler * (n_positions - len(prompt_ids) - len(script))
    model, tok = positional_gpt2(sequence, len(prompt_ids), n_positions=n_positions)
    root = mf.save_components(tmp_path_factory.mktemp("gen") / "scripted", model, tok, "text-generation",
                              instance_type="TextGenerationPipeline")
    # At most 2 sequences run at once, so the cancellation test can see a request wait for a slot;
    # tokens go out 3 per message after the first.
    with servers.model_service(root, "--gen-max-sequences", "2", "--gen-stream-interval", "3", *QUIET) as ms, \
            servers.preproc_service(root, ms.address, *QUIET) as pp:
        yield {"tokenizer": tok, "script": script, "gen": generation_stub(ms.address), "pre": preproc_stub(pp.address),
               "max_new": n_positions - len(prompt_ids), "prompt_ids": prompt_ids, "sequence": sequence}


def test_emoji_and_cjk_stream_whole_characters(scripted):
    tok, script = scripted["tokenizer"], scripted["script"]
    split_chars = [i for i in script if "\ufffd" in tok.decode([i])]
    assert len(split_chars) > 4  # the text really has characters spread over several tokens
    request = pb.GenerateTextRequest(prompt=PROMPT, parameters=pb.GenerateTextParameters(
        max_new_tokens=len(script), return_full_text=False))
    chunks = list(scripted["pre"].GenerateTextStream(request))
    texts = [c.text for c in chunks]
    assert "".join(texts) == SCRIPT_TEXT
    assert [t for c in chunks for t in c.token_ids] == script
    assert not any("\ufffd" in t for t in texts)
    assert chunks[-1].finish_reason == "length"
    assert scripted["pre"].GenerateText(request).generated_text == SCRIPT_TEXT


def test_stream_interval_groups_tokens_after_the_first(scripted):
    n = len(scripted["script"])
    steps = list(scripted["gen"].Generate(gpb.GenerateRequest(
        input_ids=scripted["prompt_ids"], settings=gpb.GenerationSettings(max_new_tokens=n))))
    assert [t for s in steps for t in s.token_ids] == scripted["script"]
    assert len(steps[0].token_ids) == 1  # time to first token is not traded away
    assert len(steps) <= 1 + math.ceil((n - 1) / 3)
    assert [s.generated_tokens for s in steps] == list(itertools.accumulate(len(s.token_ids) for s in steps))


@pytest.mark.parametrize("stop", ["END", "D of r", "の 首"])
def test_stop_string_spanning_tokens_cuts_and_stops_the_model(scripted, stop):
    tok = scripted["tokenizer"]
    pieces = [tok.decode([i]) for i in scripted["script"]]
    assert stop not in pieces and not any(stop in p for p in pieces)  # it spans a token boundary
    before = scripted["gen"].Stats(gpb.GenerationStatsRequest())
    params = pb.GenerateTextParameters(max_new_tokens=scripted["max_new"], stop=[stop, "never seen"],
                                       return_full_text=False)
    response = scripted["pre"].GenerateText(pb.GenerateTextRequest(prompt=PROMPT, parameters=params))
    assert response.generated_text == SCRIPT_TEXT[:SCRIPT_TEXT.index(stop)]
    assert response.finish_reason == "stop"
    # Usage counts the tokens up to the one that completed the stop string.
    script = scripted["script"]
    assert response.usage.completion_tokens == next(k for k in range(1, len(script) + 1)
                                                    if stop in tok.decode(script[:k]))
    chunks = list(scripted["pre"].GenerateTextStream(pb.GenerateTextRequest(prompt=PROMPT, parameters=params)))
    assert "".join(c.text for c in chunks) == response.generated_text and chunks[-1].finish_reason == "stop"
    # preproc cancelled both model streams long before their ~1000 tokens: the slots are free again.
    gen = scripted["gen"]
    after = servers.wait_for(lambda: (s := gen.Stats(gpb.GenerationStatsRequest())).active_sequences == 0 and s,
                             what="the model to drop the stopped sequences")
    assert after.cancelled - before.cancelled == 2
    assert after.generated_tokens - before.generated_tokens < scripted["max_new"]


def expected_tokens(scripted, n):
    return scripted["sequence"][:n]


def test_cancel_frees_the_slot_while_other_streams_go_on(scripted):
    gen = scripted["gen"]

    def stats():
        return gen.Stats(gpb.GenerationStatsRequest())

    base = stats()
    long = gpb.GenerationSettings(max_new_tokens=scripted["max_new"])
    prompt = scripted["prompt_ids"]
    a = gen.Generate(gpb.GenerateRequest(input_ids=prompt, settings=long))
    b = gen.Generate(gpb.GenerateRequest(input_ids=prompt, settings=long))
    assert list(next(a).token_ids)[:1] == scripted["script"][:1]
    b_tokens = list(next(b).token_ids)
    assert stats().active_sequences == 2

    # Both slots are taken: a third request waits.
    c_result = {}

    def run_c():
        c_result["steps"] = list(gen.Generate(gpb.GenerateRequest(
            input_ids=prompt, settings=gpb.GenerationSettings(max_new_tokens=5))))

    c_thread = threading.Thread(target=run_c)
    c_thread.start()
    servers.wait_for(lambda: stats().waiting_sequences == 1, what="the third request to queue")

    a.cancel()  # the caller goes away: its slot frees at the next step, and C takes it
    c_thread.join(60)
    assert [t for s in c_result["steps"] for t in s.token_ids] == expected_tokens(scripted, 5)
    now = stats()
    assert now.cancelled - base.cancelled == 1 and now.waiting_sequences == 0
    assert now.active_sequences == 1  # B still running
    with pytest.raises(grpc.RpcError) as info:
        next(a)
    assert info.value.code() == grpc.StatusCode.CANCELLED

    # B went on unchanged: its tokens are still the script.
    for _ in range(5):
        b_tokens += next(b).token_ids
    assert b_tokens == expected_tokens(scripted, len(b_tokens))
    b.cancel()
    servers.wait_for(lambda: stats().active_sequences == 0, what="B's slot to free")
    assert stats().cancelled - base.cancelled == 2


def test_client_cancelling_preproc_stream_cancels_the_model(scripted):
    gen = scripted["gen"]
    before = gen.Stats(gpb.GenerationStatsRequest())
    stream = scripted["pre"].GenerateTextStream(pb.GenerateTextRequest(
        prompt=PROMPT, parameters=pb.GenerateTextParameters(max_new_tokens=scripted["max_new"],
                                                            return_full_text=False)))
    text = "".join(next(stream).text for _ in range(3))
    assert text and (SCRIPT_TEXT + FILLER * 1000).startswith(text)
    stream.cancel()
    after = servers.wait_for(lambda: (s := gen.Stats(gpb.GenerationStatsRequest())).active_sequences == 0 and s,
                     what="the model to drop the cancelled sequence")
    assert after.cancelled - before.cancelled == 1
    assert after.generated_tokens - before.generated_tokens < scripted["max_new"]
