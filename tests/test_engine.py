"""model_service/engine.py without a server: forward workers run side by side on a real tiny model,
and work that may change the model (engine.run) runs alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from model_service import loader
from model_service.backends import EagerBackend
from model_service.engine import Engine, default_forward_workers
from splitserve_common.errors import FailedPrecondition
from tests import model_factory
from tests.model_service_helpers import until


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
            # The run waits for the forward pass (a fixed 0.2 s once stood in for this: on a loaded machine
            # its thread could reach the lock after the later forward's).
            await until(lambda: engine._model_use._waiting_alone == 1, "the run waiting for the forward pass")
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



async def infer_in_process(engine: Engine, rows: list[list[int]], outputs=None) -> list[dict]:
    """The ModelInfer path without a server: servicer -> batcher -> engine, one request per row, all at once."""
    import numpy as np

    from model_service import cli
    from model_service.batcher import Batcher
    from model_service.inference_servicer import InferenceServicer
    from model_service.runtime import Runtime
    from model_service.served_model import discover
    from splitserve_common import v2_codec

    args = cli.parse_args(["--model-dir", "unused"])
    runtime = Runtime(args)
    info = await engine.run(discover, engine, "tc", 8)
    batcher = Batcher(engine, info, max_batch_size=8, max_wait_us=args.max_wait_us, token_budget=args.token_budget,
                      max_queue_rows=args.max_queue_rows, overhead_tokens=args.batch_overhead_tokens)
    batcher.start()
    runtime.engine, runtime.info, runtime.batcher = engine, info, batcher
    runtime.ready.set()
    servicer = InferenceServicer(runtime)
    try:
        responses = await asyncio.gather(*(servicer.infer(v2_codec.encode_request(
            {"input_ids": np.asarray(row, dtype=np.int64)[None, :]}, outputs=outputs), None) for row in rows))
    finally:
        await batcher.stop()
        engine.close()
    return [dict(v2_codec.decode_response(r)) for r in responses]


def test_model_infer_on_the_base_model_runs_on_the_forward_workers(loaded):
    """A ModelInfer naming no adapter (the base model) is batched onto the forward workers, not the main
    worker that runs alone: the path through the servicer and the batcher, observed on the model itself."""
    threads: list[str] = []

    def record(module, args):
        threads.append(threading.current_thread().name)

    async def scenario():
        engine = Engine(loaded, torch_threads=1, forward_workers=2)
        await engine.run(lambda: None)  # the main worker exists
        # The embeddings run in every forward pass, padded or padding-free (backends.py).
        hook = loaded.model.bert.embeddings.register_forward_pre_hook(record)
        try:
            return await infer_in_process(engine, [list(range(2, 9))])
        finally:
            hook.remove()

    (answer,) = asyncio.run(scenario())
    discovery = 2  # served_model.discover's warm-up passes run on the main worker
    assert threads[discovery:] and all(name.startswith("forward") for name in threads[discovery:]), threads
    with torch.inference_mode():
        torch.testing.assert_close(torch.tensor(answer["logits"]), loaded.model(**inputs(7)).logits)


class RowByRowBackend:
    """A second engine behind model_service/backends.py's interface: every row computed alone at its own
    length (no padding), outputs padded back to the batch's length. Counts the rows it computed."""

    supports_adapters = False

    def __init__(self, loaded):
        self.eager = EagerBackend(loaded)
        self.rows = 0
        self.largest_batch = 0

    def __call__(self, inputs: dict, hidden_states: bool = False) -> dict:
        length = inputs["input_ids"].shape[1]
        self.largest_batch = max(self.largest_batch, len(inputs["input_ids"]))
        per_row = []
        for i, used in enumerate(inputs["attention_mask"].sum(dim=1).tolist()):
            alone = self.eager({name: value[i:i + 1, :used] for name, value in inputs.items()}, hidden_states)
            per_row.append({name: torch.nn.functional.pad(value, (0, 0, 0, length - used)) if value.ndim == 3
                            else value for name, value in alone.items()})
            self.rows += 1
        return {name: torch.cat([row[name] for row in per_row]) for name in per_row[0]}


def test_a_second_backend_plugs_in_with_equal_answers(loaded):
    """Another engine goes in through Engine(backend=...) alone: the batcher and servicer are the same, the
    answers equal the eager engine's, rows of different lengths sharing padded batches."""
    rows = [list(range(2, 2 + n)) for n in (3, 11, 6, 17, 4, 9)]
    backend = RowByRowBackend(loaded)
    outputs = ["logits", "last_hidden_state"]
    other = asyncio.run(infer_in_process(Engine(loaded, torch_threads=1, forward_workers=2, backend=backend),
                                         rows, outputs))
    eager = asyncio.run(infer_in_process(Engine(loaded, torch_threads=1, forward_workers=2), rows, outputs))
    assert backend.rows >= len(rows) + 2  # the warm-up passes and every request's row
    assert backend.largest_batch > 1  # rows of different lengths were padded into one pass
    for got, want in zip(other, eager, strict=True):
        for name in outputs:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_an_engine_without_adapters_refuses_adapter_rows(loaded):
    engine = Engine(loaded, torch_threads=1, forward_workers=1, backend=RowByRowBackend(loaded))
    try:
        with pytest.raises(FailedPrecondition, match="RowByRowBackend engine cannot apply adapters"):
            asyncio.run(engine.run(engine.forward, inputs(4), adapters=["some-adapter"]))
    finally:
        engine.close()
