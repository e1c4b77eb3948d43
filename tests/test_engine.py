"""model_service/engine.py without a server: forward workers run side by side on a real tiny model,
and work that may change the model (engine.run) runs alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from model_service import loader
from model_service.engine import Engine, default_forward_workers
from tests import model_factory


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model, tokenizer = model_factory.build_encoder("text-classification", seed=4)
    directory = model_factory.save_components(tmp_path_factory.mktemp("engine") / "tc", model, tokenizer,
                                              "text-classification")
    return loader.load(loader.LoadOptions(model_dir=str(directory), device="cpu"))


def inputs(length: int) -> dict:
    ids = torch.arange(2, 2 + length).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_forward_workers_run_side_by_side_and_answer_like_one(loaded):
    async def scenario():
        engine = Engine(loaded, torch_threads=1, forward_workers=2)
        both_inside = threading.Barrier(2, timeout=10)

        def forward(length):
            both_inside.wait()  # only passes when the two forward passes are inside at the same time
            return engine.forward(inputs(length))["logits"]

        try:
            together = await asyncio.gather(engine.run_forward(forward, 5), engine.run_forward(forward, 9))
            alone = [await engine.run(lambda n=n: engine.forward(inputs(n))["logits"]) for n in (5, 9)]
        finally:
            engine.close()
        return together, alone

    together, alone = asyncio.run(scenario())
    for got, want in zip(together, alone, strict=True):
        torch.testing.assert_close(got, want)


def test_run_waits_for_forward_passes_and_holds_them_off(loaded):
    async def scenario():
        engine = Engine(loaded, torch_threads=1, forward_workers=2)
        events: list[str] = []
        forward_inside, release = threading.Event(), threading.Event()

        def slow_forward():
            events.append("forward start")
            forward_inside.set()
            release.wait(10)
            events.append("forward end")

        def change_model():
            events.append("run")

        try:
            first = asyncio.ensure_future(engine.run_forward(slow_forward))
            await asyncio.to_thread(forward_inside.wait, 10)
            change = asyncio.ensure_future(engine.run(change_model))
            await asyncio.sleep(0.2)
            later = asyncio.ensure_future(engine.run_forward(lambda: events.append("later forward")))
            await asyncio.sleep(0.2)
            assert events == ["forward start"]  # run waits for the forward; the later forward waits for run
            release.set()
            await asyncio.gather(first, change, later)
        finally:
            engine.close()
        return events

    assert asyncio.run(scenario()) == ["forward start", "forward end", "run", "later forward"]


def test_default_split():
    assert default_forward_workers("cpu", 16) == 2 and default_forward_workers("cpu", 1) == 1
    assert default_forward_workers("cuda", 16) == 1


def test_model_infer_on_the_base_model_runs_on_the_forward_workers(loaded, tmp_path):
    """A ModelInfer naming no adapter (the base model) is batched onto the forward workers, not the main
    worker that runs alone: the path through the servicer and the batcher, observed on the model itself."""
    import numpy as np

    from model_service import cli
    from model_service.batcher import Batcher
    from model_service.inference_servicer import InferenceServicer
    from model_service.runtime import Runtime
    from model_service.served_model import discover
    from splitserve_common import v2_codec

    args = cli.parse_args(["--model-dir", str(tmp_path)])
    threads: list[str] = []
    hook = loaded.model.register_forward_pre_hook(lambda module, inputs: threads.append(
        threading.current_thread().name))

    async def scenario():
        runtime = Runtime(args)
        engine = Engine(loaded, torch_threads=1, forward_workers=2)
        info = await engine.run(discover, engine, "tc", 8)
        batcher = Batcher(engine, info, max_batch_size=8, max_wait_us=args.max_wait_us,
                          token_budget=args.token_budget, max_queue_rows=args.max_queue_rows,
                          overhead_tokens=args.batch_overhead_tokens)
        batcher.start()
        runtime.engine, runtime.info, runtime.batcher = engine, info, batcher
        runtime.ready.set()
        threads.clear()  # the warm-up ran on the main worker
        try:
            request = v2_codec.encode_request({"input_ids": np.arange(2, 9, dtype=np.int64)[None, :]})
            response = await InferenceServicer(runtime).infer(request, None)
        finally:
            await batcher.stop()
            engine.close()
        return v2_codec.decode_response(response)["logits"]

    try:
        logits = asyncio.run(scenario())
    finally:
        hook.remove()
    with torch.inference_mode():
        torch.testing.assert_close(torch.tensor(logits), loaded.model(**inputs(7)).logits)
    assert threads and all(name.startswith("forward") for name in threads), threads
