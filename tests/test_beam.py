"""model_service/generation/beam.py in process: which requests leave the continuous batch, what is
refused by name, and beam search / n-gram blocking equal to model.generate token for token."""

from __future__ import annotations

import pytest

from model_service import loader
from model_service.engine import Engine
from model_service.generation.batch import Sequence
from model_service.generation.beam import SearchParams, SearchRunner, resolve_search
from model_service.generation.sampling import model_defaults, resolve
from splitserve_common.errors import InvalidArgument
from splitserve_pb import generation_pb2 as gpb
from tests.generation_helpers import BUILDERS, reference_generate, save_generative

PROMPTS = ["the river of", "Alice walk to the market in Paris with a friend and"]


def search_of(defaults=None, max_beams=8, **settings):
    message = gpb.GenerationSettings(**settings)
    defaults = model_defaults({}, defaults or {})
    params = resolve(message, defaults, prompt_len=3, context_len=0, eos_token_ids=[0])
    return resolve_search(message, defaults, params, max_beams)


def test_plain_requests_stay_in_the_continuous_batch():
    assert search_of() is None
    assert search_of(num_beams=1, num_return_sequences=1, no_repeat_ngram_size=0) is None
    assert search_of(do_sample=True, temperature=0.7) is None


def test_beams_and_ngram_blocking_leave_it():
    assert search_of(num_beams=4, length_penalty=0.5, early_stopping=True) == SearchParams(4, 0.5, True, 0)
    assert search_of(no_repeat_ngram_size=2) == SearchParams(1, 1.0, False, 2)


def test_saved_model_config_beams_are_not_served_greedy():
    assert search_of({"num_beams": 3, "length_penalty": 2.0}) == SearchParams(3, 2.0, False, 0)
    assert search_of({"num_beams": 3}, num_beams=1) is None  # the request's own value wins


@pytest.mark.parametrize("settings, defaults, words", [
    ({"num_return_sequences": 2}, None, "num_return_sequences=2 is not supported"),
    ({}, {"num_return_sequences": 3}, "num_return_sequences=3"),
    ({"num_beams": 0}, None, "num_beams must be in [1, 8] (--gen-max-beams), got 0"),
    ({"num_beams": 9}, None, "--gen-max-beams"),
    ({"length_penalty": 2.0}, None, "length_penalty applies to beam search only"),
    ({"early_stopping": True, "num_beams": 1}, None, "early_stopping applies to beam search only"),
    ({"num_beams": 2, "do_sample": True}, None, "do_sample with num_beams > 1"),
    ({"no_repeat_ngram_size": 2, "do_sample": True}, None, "do_sample with no_repeat_ngram_size"),
    ({"num_beams": 2, "logprobs": True}, None, "logprobs with num_beams > 1"),
    ({"no_repeat_ngram_size": -1}, None, "no_repeat_ngram_size must be >= 0"),
    ({"num_beams": 2, "presence_penalty": 0.5}, None, "presence_penalty with num_beams > 1 is not supported"),
    ({"no_repeat_ngram_size": 2, "frequency_penalty": 0.5}, None, "frequency_penalty with no_repeat_ngram_size"),
    ({"num_beams": 2}, {"early_stopping": "never"}, "early_stopping='never'"),
    ({"num_beams": 2, "ignore_eos": True}, None, "ignore_eos with num_beams > 1"),
])
def test_what_cannot_be_honoured_is_refused_by_name(settings, defaults, words):
    with pytest.raises(InvalidArgument) as excinfo:
        search_of(defaults, **settings)
    assert words in str(excinfo.value)


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def runner(request, tmp_path_factory):
    root = save_generative(tmp_path_factory.mktemp("beam") / request.param, request.param)
    loaded = loader.load(loader.LoadOptions(model_dir=str(root), device="cpu"))
    engine = Engine(loaded, torch_threads=1)
    _, tokenizer = BUILDERS[request.param]()
    yield SearchRunner(engine, loaded.model, loaded.config.is_encoder_decoder, loaded.pad_token_id, 1 << 20, 8), \
        tokenizer, list(loaded.special_ids["eos_token_id"])
    engine.close()


@pytest.mark.parametrize("options", [
    {"num_beams": 3, "repetition_penalty": 1.3, "min_new_tokens": 6},
    {"num_beams": 4, "length_penalty": 0.5, "early_stopping": True, "no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 1},
])
def test_search_equals_model_generate_token_for_token(runner, options):
    search_runner, tokenizer, eos = runner
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        settings = gpb.GenerationSettings(max_new_tokens=12, **options)
        defaults = model_defaults({}, {})
        context = 0 if search_runner.is_encoder_decoder else len(ids) + 200
        params = resolve(settings, defaults, prompt_len=len(ids), context_len=context, eos_token_ids=eos)
        search = resolve_search(settings, defaults, params, 8)
        tokens, logprobs = search_runner.generate(Sequence("t", ids, params), search)
        want = reference_generate(search_runner.model, tokenizer, ids, max_new_tokens=12, do_sample=False,
                                  **options)
        if want and want[-1] in eos:
            assert tokens == want
        else:  # generate pads a finished beam to the longest; the answer ends at the first eos
            assert tokens == want[: len(tokens)] and (len(tokens) == len(want) or tokens[-1] in eos)
        assert logprobs == []


def test_greedy_ngram_blocking_reports_logprobs(runner):
    search_runner, tokenizer, eos = runner
    ids = tokenizer("the river of")["input_ids"]
    settings = gpb.GenerationSettings(max_new_tokens=8, no_repeat_ngram_size=2, logprobs=True, top_logprobs=3)
    params = resolve(settings, model_defaults({}, {}), prompt_len=len(ids), context_len=0, eos_token_ids=eos)
    tokens, logprobs = search_runner.generate(Sequence("t", ids, params),
                                              resolve_search(settings, {}, params, 8))
    assert len(logprobs) == len(tokens) > 0 and all(lp <= 0 for lp in logprobs)
    assert all(len(lp.top_ids) == 3 and lp.top_logprobs[0] >= lp for lp in logprobs)
