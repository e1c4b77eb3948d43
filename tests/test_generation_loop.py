"""The generation loop: torch threads chosen by measuring decode steps (threads.py), prefill in
length groups."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch

from model_service.threads import StepThreads


def drive(chooser: StepThreads, cost_per_row, steps: int, rows: int = 8) -> list[int]:
    """Feed `steps` decode steps whose cost per row is cost_per_row(threads); the counts used."""
    used = []
    for _ in range(steps):
        threads = chooser.threads()
        used.append(threads)
        chooser.record(cost_per_row(threads) * rows, rows)
    return used


@pytest.mark.parametrize("interleave", [False, True])
def test_keeps_the_count_whose_steps_cost_less_and_follows_a_change_of_load(interleave):
    chooser = StepThreads(available=2, period=20, probe=3, interleave=interleave)
    assert chooser.threads() == 2  # starts with every thread of the worker
    quiet = {1: 0.010, 2: 0.006}   # an idle node: two threads split the matrix products
    busy = {1: 0.012, 2: 0.040}    # cores shared with busy processes: threads wait on each other
    used = drive(chooser, busy.get, 60)
    assert chooser.current == 1 and used[-20:].count(2) <= 3  # switched early, only probes use 2 since
    used = drive(chooser, quiet.get, 60)
    assert chooser.current == 2 and used[-20:].count(1) <= 3
    used = drive(chooser, {1: 0.010, 2: 0.0098}.get, 60)  # within the margin: no flapping
    assert chooser.current == 2


@pytest.mark.parametrize("interleave", [False, True])
def test_a_probe_compares_steps_of_like_sizes_only(interleave):
    """A decode step's cost per row falls as rows join (each step reads every weight once): waves of
    requests joining one by one put steps of 1-4 rows before steps of 32. Two threads are faster at
    every size here; comparing a probe's 32-row steps with 1-4-row steps on two threads (or the
    reverse) kept one thread. Only steps of like sizes are compared now."""
    def seconds(threads, rows):  # a fixed part (the weights) and a part per row
        return {1: 0.020 + 0.0020 * rows, 2: 0.012 + 0.0012 * rows}[threads]

    chooser = StepThreads(available=2, period=20, probe=3, interleave=interleave)
    used = []
    for _ in range(6):  # six waves: requests join one by one, then 32 rows decode together
        for rows in [1, 1, 2, 2, 3, 4] + [32] * 30:
            threads = chooser.threads()
            used.append(threads)
            chooser.record(seconds(threads, rows), rows)
    assert chooser.current == 2
    assert used.count(1) <= len(used) // 5, used  # probes only


def waves_with_bursts(chooser: StepThreads, waves: int = 6) -> list[int]:
    """bench_generation's 32 streams: each wave starts with one request alone, then 31 join; the first
    three 32-row steps after the join run while the client and preproc_service (same cores) handle the
    31 first tokens, at 2.5x the cost whatever the threads. Two threads cost 0.6x one thread per row."""
    used = []
    for _ in range(waves):
        for index, rows in enumerate([1] + [32] * 32):
            threads = chooser.threads()
            used.append(threads)
            chooser.record({1: 1.0, 2: 0.6}[threads] * (2.5 if 1 <= index <= 3 else 1.0) * rows, rows)
    return used


def test_interleaved_probes_are_not_misled_by_a_busy_stretch_before_them():
    """Issue 13: the generation steps' first probe (1 thread) was compared with the 2-thread steps just
    before it, which ran while the first tokens of 31 joining rows went out, and kept 1 thread on an idle
    node (where 2 gave 380 against 280 tokens/s through the stack). The steps now alternate probe and
    current steps, each probe against its neighbours, and keep the cheaper count whatever the stretch."""
    chooser = StepThreads(available=2, interleave=True)  # the scheduler's chooser
    used = waves_with_bursts(chooser)
    assert chooser.current == 2 and used.count(1) <= len(used) // 8, used  # probes only
    chooser = StepThreads(available=2, interleave=True, start_with_fewest=True)
    waves_with_bursts(chooser)
    assert chooser.current == 2  # and it finds the cheaper count from the other side too


def test_the_scheduler_interleaves_its_probes(engine):
    from model_service.generation.batch import GenerationModel
    from model_service.generation.scheduler import Scheduler

    loaded = engine.loaded
    scheduler = Scheduler(engine, GenerationModel(loaded.model, loaded.pad_token_id, None))
    assert scheduler._lanes[0].core.threads.interleave


def test_a_fixed_count_or_a_single_thread_worker_never_probes():
    for chooser, expected in ((StepThreads(available=4, fixed=3, period=2, probe=1), 3),
                              (StepThreads(available=1, period=2, probe=1), 1)):
        assert set(drive(chooser, {1: 1.0, 3: 5.0, 4: 0.1}.get, 30)) == {expected}


def test_a_step_runs_with_the_chosen_count_and_restores_the_workers():
    before = torch.get_num_threads()
    chooser = StepThreads(available=before + 1, fixed=before + 1)
    with chooser.step(rows=4):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- the scheduler on the real engine

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from model_service.engine import Engine
    from model_service.loader import LoadOptions, load
    from tests.generation_helpers import save_generative

    eng = Engine(load(LoadOptions(model_dir=str(save_generative(tmp_path_factory.mktemp("gen") / "gpt2")))))
    yield eng
    eng.close()


# Seconds a test waits for a sequence's next token: the scheduler may be slow under load, never silent.
EVENT_SECONDS = 120


async def drain(seq) -> list[int]:
    tokens = []
    while True:
        event = await asyncio.wait_for(seq.events.get(), EVENT_SECONDS)  # fails, not hangs, if none comes
        if isinstance(event, Exception):
            raise event
        tokens.append(event.token)
        if event.finish_reason:
            return tokens


def test_prompts_admitted_together_prefill_in_length_groups_and_each_equals_generate(engine):
    """Six requests arrive together, prompts of 1 to ~60 tokens: they prefill in more than one pass
    (by length), and each still generates exactly what model.generate does alone."""
    from model_service.generation.batch import GenerationModel, Sequence
    from model_service.generation.sampling import model_defaults, resolve
    from model_service.generation.scheduler import Scheduler
    from splitserve_pb import generation_pb2 as gpb
    from tests.generation_helpers import reference_generate
    from tests.model_factory import bytelevel_bpe_tokenizer

    loaded, tokenizer = engine.loaded, bytelevel_bpe_tokenizer()
    gm = GenerationModel(loaded.model, loaded.pad_token_id, None)
    texts = ["a", "the river", "Alice walk to the market", "she said that the friend of Alice walks to the old "
             "market by the river in the morning and Bob", "why " * 30, "東京 🙂 " * 12]
    prompts = [tokenizer(t)["input_ids"] for t in texts]

    async def scenario():
        scheduler = Scheduler(engine, gm)
        seqs = []
        for ids in prompts:
            params = resolve(gpb.GenerationSettings(max_new_tokens=6, min_new_tokens=6), model_defaults({}, {}),
                             prompt_len=len(ids), context_len=256, eos_token_ids=[])
            seqs.append(scheduler.submit(Sequence("s", list(ids), params)))
        results = [await drain(seq) for seq in seqs]
        await scheduler.stop()
        return results, scheduler._lanes[0].core.prefill_passes

    results, passes = asyncio.run(scenario())
    assert passes > 1
    for tokens, ids in zip(results, prompts, strict=True):
        assert tokens == reference_generate(loaded.model, tokenizer, ids, max_new_tokens=6, min_new_tokens=6,
                                            do_sample=False)


def test_a_greedy_stream_progresses_while_a_beam_search_runs(tmp_path):
    """A long beam search on the base model runs on one forward worker; the continuous batch keeps
    stepping on the other: a greedy request submitted after it finishes while the search runs."""
    from model_service.engine import Engine
    from model_service.generation.batch import GenerationModel, Sequence
    from model_service.generation.beam import SearchParams, SearchRunner
    from model_service.generation.sampling import model_defaults, resolve
    from model_service.generation.scheduler import Scheduler
    from model_service.loader import LoadOptions, load
    from splitserve_pb import generation_pb2 as gpb
    from tests.generation_helpers import save_generative

    eng = Engine(load(LoadOptions(model_dir=str(save_generative(tmp_path / "gpt2")))), torch_threads=1,
                 forward_workers=2)
    loaded = eng.loaded
    gm = GenerationModel(loaded.model, loaded.pad_token_id, None)

    def seq(new_tokens):
        params = resolve(gpb.GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                         model_defaults({}, {}), prompt_len=3, context_len=256,
                         eos_token_ids=loaded.special_ids["eos_token_id"])
        return Sequence("s", [5, 6, 7], params)

    async def scenario():
        searches = SearchRunner(eng, loaded.model, False, loaded.pad_token_id, 1 << 20, 8)
        scheduler = Scheduler(eng, gm)
        beam = searches.submit(seq(240), SearchParams(num_beams=8, length_penalty=1.0, early_stopping=False,
                                                      no_repeat_ngram_size=0))
        await asyncio.sleep(0)  # the search's task reaches the engine first
        greedy = scheduler.submit(seq(12))
        tokens = await drain(greedy)
        beam_running = not beam.finish_reason
        beam_tokens = await drain(beam)
        await scheduler.stop()
        return tokens, beam_running, beam_tokens

    try:
        tokens, beam_running, beam_tokens = asyncio.run(scenario())
    finally:
        eng.close()
    assert len(tokens) == 12 and len(beam_tokens) == 240
    assert beam_running  # the greedy request did not wait for the search


# ---------------------------------------------------------------- matrix products on oneDNN (matmuls.py)

def test_installed_linears_run_on_onednn_only_inside_routed_on_this_thread(monkeypatch):
    import copy
    import threading

    from transformers.pytorch_utils import Conv1D

    from model_service import matmuls

    assert matmuls.available()  # torch 2.13's CPU build carries oneDNN
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 24), Conv1D(16, 24), torch.nn.Linear(16, 8, bias=False),
                                torch.nn.Linear(8, 8).double())
    x = torch.randn(5, 3, 48)
    with torch.inference_mode():
        expected = model[2](model[1](model[0](x)))
    assert matmuls.install(model) == 4 and matmuls.install(model) == 0  # once; same classes' subclasses
    assert isinstance(model[1], Conv1D) and isinstance(model[0], torch.nn.Linear)
    routed = []
    monkeypatch.setattr(matmuls, "linear", lambda x, w, b, linear=matmuls.linear: routed.append(w.shape) or
                        linear(x, w, b))

    def run(x):
        return model[2](model[1](model[0](x)))

    with torch.inference_mode():
        outside = run(x)
        with matmuls.routed():
            inside = run(x)
            strided = run(x.transpose(0, 1))
            as_double = model[3](torch.randn(2, 8, dtype=torch.float64))  # not fp32: torch's own
            other = []
            thread = threading.Thread(target=lambda: other.append(run(x)))  # routed() is this thread's only
            thread.start()
            thread.join()
    assert routed == [(24, 48), (16, 24), (8, 16)] * 2  # Conv1D's [in, out] weight goes as its [out, in] view
    assert torch.equal(outside, expected) and torch.equal(other[0], expected)
    torch.testing.assert_close(inside, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert as_double.dtype == torch.float64
    with matmuls.routed():  # autograd: torch's own kernels
        run(x).sum().backward()
    assert model[0].weight.grad is not None and len(routed) == 6
    clone = copy.deepcopy(model)  # a copy computes with its own parameters
    with torch.no_grad():
        clone[2].weight.zero_()
        with matmuls.routed():
            assert not run(x).eq(0).all() and clone[2](clone[1](clone[0](x))).eq(0).all()


def three_prompts_through_the_scheduler(engine, **scheduler_args) -> None:
    """Three prompts of unlike lengths, 12 greedy tokens each, through a Scheduler on `engine` built with
    `scheduler_args`; each answer must equal model.generate's (torch's own kernels) token for token."""
    from model_service.generation.batch import GenerationModel, Sequence
    from model_service.generation.sampling import model_defaults, resolve
    from model_service.generation.scheduler import Scheduler
    from splitserve_pb import generation_pb2 as gpb
    from tests.generation_helpers import reference_generate
    from tests.model_factory import bytelevel_bpe_tokenizer

    loaded, tokenizer = engine.loaded, bytelevel_bpe_tokenizer()
    gm = GenerationModel(loaded.model, loaded.pad_token_id, None)
    prompts = [tokenizer(t)["input_ids"] for t in ("the river", "Alice walks to the old market", "why " * 20)]

    async def scenario():
        scheduler = Scheduler(engine, gm, **scheduler_args)
        settings = gpb.GenerationSettings(max_new_tokens=12, min_new_tokens=12)
        seqs = [scheduler.submit(Sequence("s", list(ids), resolve(settings, model_defaults({}, {}), prompt_len=len(ids),
                                                                   context_len=256, eos_token_ids=[])))
                for ids in prompts]
        results = [await drain(seq) for seq in seqs]
        await scheduler.stop()
        return results

    for tokens, ids in zip(asyncio.run(scenario()), prompts, strict=True):
        assert tokens == reference_generate(loaded.model, tokenizer, ids, max_new_tokens=12, min_new_tokens=12,
                                            do_sample=False)


@pytest.mark.parametrize("onednn", [True, False])
def test_the_steps_matrix_products_run_on_onednn_by_default_with_ids_equal_to_generate(engine, onednn, monkeypatch):
    """The scheduler's prefill and decode steps route the model's matrix products to oneDNN (unless
    turned off), and greedy ids still equal model.generate's (torch's default kernels) token for token."""
    from model_service import matmuls

    routed = collections.Counter()  # (rows, weight shape) of each product oneDNN ran, on the engine's worker

    def counted(x, weight, bias, linear=matmuls.linear):
        routed[(x.shape[0], tuple(weight.shape))] += 1
        return linear(x, weight, bias)

    monkeypatch.setattr(matmuls, "linear", counted)
    three_prompts_through_the_scheduler(engine, onednn_matmuls=onednn)
    config = engine.loaded.model.config
    # Each forward pass: 4 products per layer + the lm_head; rows: 3 prompts in the decode steps.
    assert (sum(routed.values()) >= 11 * (4 * config.n_layer + 1)) is onednn
    assert bool(routed) is onednn
    if onednn:
        assert routed[(3, (3 * config.n_embd, config.n_embd))] == 11 * config.n_layer  # c_attn in 11 decode steps


def test_installed_new_gelu_runs_one_fused_operator_only_inside_fused_gelu_on_this_thread():
    import threading

    from transformers.activations import NewGELUActivation

    from model_service import matmuls

    model = torch.nn.Sequential(NewGELUActivation())
    x = torch.randn(4, 3072) * 3
    with torch.inference_mode():
        expected = model(x)
        assert matmuls.install(model) == 1 and isinstance(model[0], NewGELUActivation)
        outside = model(x)
        with matmuls.fused_gelu():
            inside = model(x)
            other = []
            thread = threading.Thread(target=lambda: other.append(model(x)))  # fused_gelu() is this thread's only
            thread.start()
            thread.join()
    assert torch.equal(outside, expected) and torch.equal(other[0], expected)  # the 8 operators, bit for bit
    assert torch.equal(inside, torch.nn.functional.gelu(x, approximate="tanh"))  # torch's one operator
    torch.testing.assert_close(inside, expected, rtol=1e-6, atol=1e-6)  # the same formula


@pytest.mark.parametrize("fused", [True, False])
def test_the_steps_run_gpt2s_gelu_as_one_operator_by_default_with_ids_equal_to_generate(engine, fused, monkeypatch):
    """Issue 13: GPT-2's gelu_new is 8 elementwise operators, each a barrier of the step's intra-op threads
    (with 2 threads, a 32-row GPT-2-small decode step made 369 voluntary context switches, 201 with the fused
    operator). The scheduler's prefill and decode steps now run torch's fused tanh GELU (unless turned off),
    and greedy ids still equal model.generate's token for token."""
    assert engine.loaded.model.config.activation_function == "gelu_new"
    calls = collections.Counter()  # rows of each fused GELU call

    def counted(x, *args, gelu=torch.nn.functional.gelu, **kwargs):
        if kwargs.get("approximate") == "tanh":
            calls[x.shape[0]] += 1
        return gelu(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "gelu", counted)
    three_prompts_through_the_scheduler(engine, fused_gelu=fused)
    # one per layer per pass; rows: the 3 prompts together in the 11 decode steps
    assert calls[3] == (11 * engine.loaded.model.config.n_layer if fused else 0)
