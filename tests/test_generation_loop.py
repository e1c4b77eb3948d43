"""The generation loop: torch threads chosen by measuring decode steps (threads.py), prefill in
length groups."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch

from model_service.generation.threads import StepThreads


def drive(chooser: StepThreads, cost_per_row, steps: int, rows: int = 8) -> list[int]:
    """Feed `steps` decode steps whose cost per row is cost_per_row(threads); the counts used."""
    used = []
    for _ in range(steps):
        threads = chooser.threads()
        used.append(threads)
        chooser.record(cost_per_row(threads) * rows, rows)
    return used


def test_keeps_the_count_whose_steps_cost_less_and_follows_a_change_of_load():
    chooser = StepThreads(available=2, period=20, probe=3)
    assert chooser.threads() == 2  # starts with every thread of the worker
    quiet = {1: 0.010, 2: 0.006}   # an idle node: two threads split the matrix products
    busy = {1: 0.012, 2: 0.040}    # cores shared with busy processes: threads wait on each other
    used = drive(chooser, busy.get, 60)
    assert chooser.current == 1 and used[-20:].count(2) <= 3  # switched early, only probes use 2 since
    used = drive(chooser, quiet.get, 60)
    assert chooser.current == 2 and used[-20:].count(1) <= 3
    used = drive(chooser, {1: 0.010, 2: 0.0098}.get, 60)  # within the margin: no flapping
    assert chooser.current == 2


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


async def drain(seq) -> list[int]:
    tokens = []
    while True:
        event = await seq.events.get()
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
        return results, scheduler._core.prefill_passes

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

def test_the_onednn_mode_routes_linear_and_addmm_and_leaves_everything_else():
    import threading

    import torch.nn.functional as F

    from model_service.generation.matmuls import OneDnnMatmuls, available

    assert available()  # torch 2.13's CPU build carries oneDNN
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen) for shape in ((5, 3, 48), (24, 48), (24,)))
    conv_w = torch.randn(48, 24, generator=gen)  # transformers' Conv1D layout: [in, out]
    calls = [
        (lambda: F.linear(x, w, b), lambda: x @ w.T + b),
        (lambda: F.linear(x, weight=w), lambda: x @ w.T),
        (lambda: torch.addmm(b, x[0], conv_w), lambda: x[0] @ conv_w + b),
        (lambda: F.linear(x.transpose(0, 1), w, b), lambda: x.transpose(0, 1) @ w.T + b),  # strided input
    ]
    with torch.inference_mode(), torch.profiler.profile() as prof, OneDnnMatmuls():
        routed = [call() for call, _ in calls]
        passed = [torch.addmm(b, x[0], conv_w, beta=0.5),  # beta: not a plain linear, stays addmm
                  F.linear(x.double(), w.double())]  # not fp32
        other = []
        thread = threading.Thread(target=lambda: other.append(F.linear(x, w, b)))  # the mode is this thread's only
        thread.start()
        thread.join()
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == len(calls)
    for got, (_, want) in zip(routed, calls, strict=True):
        torch.testing.assert_close(got, want(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(passed[0], 0.5 * b + x[0] @ conv_w)
    assert passed[1].dtype == torch.float64
    assert torch.equal(other[0], F.linear(x, w, b))  # torch's own kernel on the other thread
    with torch.enable_grad():  # autograd: torch's own ops (oneDNN's linear has no backward here)
        leaf = w.clone().requires_grad_()
        with OneDnnMatmuls():
            F.linear(x, leaf, b).sum().backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("onednn", [True, False])
def test_the_steps_matrix_products_run_on_onednn_by_default_with_ids_equal_to_generate(engine, onednn, monkeypatch):
    """The scheduler's prefill and decode steps route the model's matrix products to oneDNN (unless
    turned off), and greedy ids still equal model.generate's (torch's default kernels) token for token."""
    from model_service.generation import matmuls
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
        scheduler = Scheduler(engine, gm, onednn_matmuls=onednn)
        settings = gpb.GenerationSettings(max_new_tokens=12, min_new_tokens=12)
        seqs = [scheduler.submit(Sequence("s", list(ids), resolve(settings, model_defaults({}, {}), prompt_len=len(ids),
                                                                   context_len=256, eos_token_ids=[])))
                for ids in prompts]
        results = [await drain(seq) for seq in seqs]
        await scheduler.stop()
        return results

    routed = collections.Counter()  # (rows, weight shape) of each product oneDNN ran, on the engine's worker

    def counted(x, weight, bias, linear=matmuls._linear):
        routed[(x.shape[0], tuple(weight.shape))] += 1
        return linear(x, weight, bias)

    monkeypatch.setattr(matmuls, "_linear", counted)
    results = asyncio.run(scenario())
    config = loaded.model.config
    # Each forward pass: 4 products per layer + the lm_head; rows: 3 prompts in the decode steps.
    assert (sum(routed.values()) >= 11 * (4 * config.n_layer + 1)) is onednn
    assert bool(routed) is onednn
    if onednn:
        assert routed[(3, (3 * config.n_embd, config.n_embd))] == 11 * config.n_layer  # c_attn in 11 decode steps
    for tokens, ids in zip(results, prompts, strict=True):
        assert tokens == reference_generate(loaded.model, tokenizer, ids, max_new_tokens=12, min_new_tokens=12,
                                            do_sample=False)
