"""Generation pieces in process, on real tiny models and a real byte-level BPE tokenizer:
the continuous batch against model.generate, sampling settings, incremental detokenization,
stop strings and whitespace collapsing."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from model_service.generation.batch import DecodeBatch, GenerationModel, Sequence
from model_service.generation.sampling import TokenChooser, model_defaults, resolve
from preproc_service.generation.detokenizer import IncrementalDetokenizer
from preproc_service.generation.text_filters import StopMatcher, WhitespaceCollapser
from splitserve_common.errors import InvalidArgument
from splitserve_pb import generation_pb2 as gpb
from tests import model_factory as mf
from tests.generation_helpers import BUILDERS, reference_generate

PROMPTS = ["the river of", "Alice walk to the market in Paris with a friend and", "東京 🙂", "why"]


def make_seq(gm, ids, eos_ids=(), **settings):
    params = resolve(gpb.GenerationSettings(**settings), model_defaults({}, {}), prompt_len=len(ids),
                     context_len=0, eos_token_ids=eos_ids)
    seq = Sequence("test", list(ids), params)
    seq.chooser = TokenChooser(params, gm.device)
    return seq


def run_staggered(gm, seqs, join_every=3, group=2):
    """Drive a DecodeBatch the way the scheduler does: new sequences join every few steps,
    finished ones leave at once."""
    def unfinished(batch):  # as the scheduler does after every step: a row whose first token ends it leaves too
        return batch.filter([i for i, s in enumerate(batch.seqs) if not s.finish_reason])

    with torch.inference_mode():
        batch, joined, steps = unfinished(DecodeBatch.prefill(gm, seqs[:1])), 1, 0
        while batch is not None or joined < len(seqs):
            if batch is not None:
                batch.decode(gm)
            steps += 1
            if joined < len(seqs) and steps % join_every == 0:
                fresh = DecodeBatch.prefill(gm, seqs[joined:joined + group])
                batch = fresh if batch is None else batch.concat(fresh)
                joined += group
            if batch is not None:
                batch = unfinished(batch)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def built(request):
    model, tokenizer = BUILDERS[request.param]()
    gm = GenerationModel(model, tokenizer.pad_token_id, model.generation_config.decoder_start_token_id)
    return model, tokenizer, gm


def test_continuous_batch_matches_generate_token_for_token(built):
    """Sequences joining and leaving a running batch each get exactly what model.generate gives alone."""
    model, tokenizer, gm = built
    eos = [tokenizer.eos_token_id]
    lengths = [12, 5, 9, 7]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seqs = [make_seq(gm, ids, eos, max_new_tokens=n) for ids, n in zip(prompt_ids, lengths, strict=True)]
    run_staggered(gm, seqs)
    for seq, ids, n in zip(seqs, prompt_ids, lengths, strict=True):
        assert seq.generated == reference_generate(model, tokenizer, ids, max_new_tokens=n, do_sample=False)
        assert seq.finish_reason in ("length", "eos")


def test_continuous_batch_uses_no_deprecated_transformers_api(built):
    """Prefill, decode, join and leave pass the KV cache under the name the model's forward declares
    (`cache` on transformers 5.x, `past_key_values` before): no deprecation warning on any version."""
    model, tokenizer, gm = built
    seqs = [make_seq(gm, tokenizer(p)["input_ids"], max_new_tokens=4) for p in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        run_staggered(gm, seqs, join_every=1)
    assert all(len(seq.generated) == 4 for seq in seqs)


def test_repetition_penalty_and_min_new_tokens_match_generate(built):
    model, tokenizer, gm = built
    eos = [tokenizer.eos_token_id]
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    settings = {"max_new_tokens": 10, "min_new_tokens": 4, "repetition_penalty": 1.7}
    seqs = [make_seq(gm, ids, eos, **settings) for ids in prompt_ids]
    run_staggered(gm, seqs, join_every=2)
    for seq, ids in zip(seqs, prompt_ids, strict=True):
        assert seq.generated == reference_generate(model, tokenizer, ids, do_sample=False, **settings)


def test_same_seed_same_tokens_whatever_the_batch(built):
    model, tokenizer, gm = built
    ids = tokenizer(PROMPTS[0])["input_ids"]
    settings = {"max_new_tokens": 15, "do_sample": True, "temperature": 1.5, "top_k": 0, "seed": 1234}
    alone = make_seq(gm, ids, **settings)
    run_staggered(gm, [alone])
    crowd = [make_seq(gm, tokenizer(p)["input_ids"], do_sample=True, max_new_tokens=15) for p in PROMPTS[1:]]
    again = make_seq(gm, ids, **settings)
    run_staggered(gm, [*crowd, again], join_every=1)
    assert alone.generated == again.generated
    other = make_seq(gm, ids, **{**settings, "seed": 99})
    run_staggered(gm, [other])
    assert other.generated != alone.generated  # 15 tokens of a 500-token vocabulary at temperature 1.5


def test_top_k_one_sampling_is_greedy():
    model, tokenizer = mf.build_gpt2()
    gm = GenerationModel(model, tokenizer.pad_token_id, None)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    sampled = make_seq(gm, ids, max_new_tokens=10, do_sample=True, top_k=1, seed=5)
    nucleus = make_seq(gm, ids, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=6)
    greedy = make_seq(gm, ids, max_new_tokens=10)
    run_staggered(gm, [sampled, nucleus, greedy], join_every=1, group=3)
    assert sampled.generated == nucleus.generated == greedy.generated


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
    ({"max_new_tokens": 300}, "exceeds the model's context"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        resolve(gpb.GenerationSettings(**settings), model_defaults({}, {}), prompt_len=10, context_len=256,
                eos_token_ids=[0])


def test_defaults_precedence_and_context_clip():
    defaults = model_defaults({"do_sample": True, "temperature": 0.5, "max_new_tokens": 40},
                              {"temperature": 0.9})
    params = resolve(gpb.GenerationSettings(), defaults, prompt_len=230, context_len=256, eos_token_ids=[7])
    assert params.do_sample and params.temperature == 0.9  # model_config over generation_config.json
    assert params.max_new_tokens == 26  # clipped to the context
    assert params.eos_token_ids == {7}
    greedy = resolve(gpb.GenerationSettings(temperature=0.0), defaults, prompt_len=1, context_len=0,
                     eos_token_ids=[7])
    assert not greedy.do_sample and greedy.max_new_tokens == 40
    bare = resolve(gpb.GenerationSettings(), model_defaults({}, {}), prompt_len=1, context_len=0, eos_token_ids=[])
    assert not bare.do_sample and bare.max_new_tokens == 256


# ---------------------------------------------------------------- detokenization and text filters

@pytest.fixture(scope="module")
def bpe():
    return mf.bytelevel_bpe_tokenizer()


@pytest.mark.parametrize("text", [*mf.UNICODE_SAMPLES, " leading space and  two spaces", "a 🙂🚀 b 東京は"])
def test_incremental_detokenizer_never_splits_a_character(bpe, text):
    prompt = bpe("Say:")["input_ids"]
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    if not text.isascii():  # the test is only worth something if characters span tokens
        assert any("\ufffd" in bpe.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(bpe, prompt)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text == bpe.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    # Each piece is whole characters: it re-encodes to exactly its own UTF-8 bytes.
    for piece in pieces:
        assert piece.encode("utf-8").decode("utf-8") == piece


def test_detokenizer_keeps_special_tokens_out_and_flushes_truncated_bytes(bpe):
    ids = bpe("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    detok = IncrementalDetokenizer(bpe)
    assert detok.add(ids[:-1]) == ""  # incomplete character held back
    assert detok.flush() == bpe.decode(ids[:-1])  # ... and shown as a full decode would
    detok = IncrementalDetokenizer(bpe)
    assert detok.add([*ids, bpe.eos_token_id]) == "🙂"


@pytest.mark.parametrize("chunks, stops, text, stopped", [
    (["hello wor", "ld, EN", "D more"], ["END"], "hello world, ", "END"),
    (["abc", "de"], ["cd", "bcx"], "ab", "cd"),
    (["no stop ", "here E", "N"], ["END"], "no stop here EN", ""),
    (["x", "y", "z"], [], "xyz", ""),
    (["aaab"], ["aab", "b"], "a", "aab"),
])
def test_stop_matcher_across_chunks(chunks, stops, text, stopped):
    matcher = StopMatcher(stops)
    out = ""
    for chunk in chunks:
        out += matcher.feed(chunk)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert out == text and matcher.stopped == stopped


def test_stop_matcher_holds_back_only_possible_stop_prefixes():
    matcher = StopMatcher(["###"])
    assert matcher.feed("a#") == "a"
    assert matcher.feed("b") == "#b"


@pytest.mark.parametrize("text", ["  a \n\n b\t c  ", "word", "   ", "x  y", "\n lead and trail \n"])
def test_whitespace_collapser_matches_mlflow(text):
    expected = re.sub(r"\s+", " ", text).strip()
    for cut in range(len(text) + 1):
        collapser = WhitespaceCollapser()
        assert collapser.feed(text[:cut]) + collapser.feed(text[cut:]) == expected


# ---------------------------------------------------------------- scheduler on the real engine

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from model_service.engine import Engine
    from model_service.loader import LoadOptions, load
    from tests.generation_helpers import save_generative

    root = save_generative(tmp_path_factory.mktemp("gen") / "gpt2", "gpt2")
    eng = Engine(load(LoadOptions(model_dir=str(root))))
    yield eng
    eng.close()


def test_scheduler_token_limit_queue_limit_and_cancel(engine):
    import asyncio

    from model_service.generation.scheduler import Limits, Scheduler
    from splitserve_common.errors import ResourceExhausted

    loaded = engine.loaded
    gm = GenerationModel(loaded.model, loaded.pad_token_id, None)

    def seq(max_new):
        params = resolve(gpb.GenerationSettings(max_new_tokens=max_new, min_new_tokens=max_new),
                         model_defaults({}, {}), prompt_len=10, context_len=256, eos_token_ids=[])
        return Sequence("s", list(range(5, 15)), params)

    async def drain(s):
        tokens = []
        while True:
            event = await asyncio.wait_for(s.events.get(), 120)  # fails, not hangs, if none comes
            tokens.append(event.token)
            if event.finish_reason:
                return tokens, event.finish_reason

    async def scenario():
        scheduler = Scheduler(engine, gm, Limits(max_sequences=8, max_tokens=130, max_waiting=2))
        with pytest.raises(ResourceExhausted, match="--gen-max-tokens"):
            scheduler.submit(seq(125))  # 135 positions can never fit
        a, b = scheduler.submit(seq(50)), scheduler.submit(seq(50))  # 60 + 60 reserved
        await asyncio.wait_for(a.events.get(), 120)
        c, d = scheduler.submit(seq(5)), scheduler.submit(seq(5))  # 15 more would pass 130: they wait
        with pytest.raises(ResourceExhausted, match="queue is full"):
            scheduler.submit(seq(5))
        stats = scheduler.stats()
        assert (stats["active_sequences"], stats["waiting_sequences"], stats["tokens_in_flight"]) == (2, 2, 120)
        scheduler.cancel(a)  # frees 60 positions at the next step: c and d get in
        results = [await drain(c)]
        assert not b.finish_reason  # c got a's slot while b was still running
        results += [await drain(d), await drain(b)]
        assert [(len(tokens), reason) for tokens, reason in results] == [(5, "length"), (5, "length"), (50, "length")]
        stats = scheduler.stats()
        assert (stats["active_sequences"], stats["waiting_sequences"], stats["cancelled"]) == (0, 0, 1)
        assert stats["finished"] == 3 and len(a.generated) < 50
        await scheduler.stop()

    asyncio.run(scenario())
