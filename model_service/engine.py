"""The one owner of the model: every piece of model work runs on its single worker thread.

API for the other parts of model_service (generation, adapters, batching) — keep it stable:

    engine = Engine(loaded)                 # loaded: model_service.loader.LoadedModel
    result = await engine.run(fn, *args, **kwargs)
        Runs `fn(*args, **kwargs)` on the engine's worker thread under torch.inference_mode()
        and returns its result (exceptions propagate). Calls run one at a time, in submission
        order, so `fn` may touch the model (forward, generate step, load/unload an adapter)
        without locks. Never call engine.run from inside `fn` (it would wait on itself).
    engine.model, engine.device, engine.dtype, engine.loaded
    engine.forward(inputs, adapters=None, hidden_states=False)   # worker thread only
        One forward pass of the model on a dict of tensors (already on engine.device);
        `adapters`: one adapter name per row ("" = base model), None = all base.
        Returns the model's output as {name: tensor}.
    engine.adapters                         # model_service.adapters.AdapterRegistry, empty at start
    engine.close()

Adapters: `engine.adapters` decides what a request's `adapter` name means; it starts empty
(only the base model, "") and the Adapters service loads into it. `names()` (loaded adapter
names, for metadata), `check(name)` (event loop: raise errors.NotFound for an unknown name),
`lease(name)` (event loop: a context manager held for a request's life, so an adapter is not
unloaded under it; it yields the adapter the request means, which may be the default when it
named none) and `use(row_names)` (worker thread: a context manager that applies row i's adapter
to row i of the batch around a forward pass; "" = base). A batch may mix rows of several adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from model_service.adapters import AdapterRegistry


def default_torch_threads() -> int:
    """Every CPU this process may use: a model_service replica owns its node's cores.

    Measured on 2 idle cores (bench/bench_model_infer.py, concurrency 32): 2 threads gave
    0.68-0.78 of in-process throughput against 0.46 with 1 thread. On a machine shared with
    other busy processes torch's spinning threads cost more; pass --torch-threads there.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Engine:
    def __init__(self, loaded, torch_threads: int = 0):
        self.loaded = loaded
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        self.dtype = getattr(torch, loaded.dtype)
        self.adapters = AdapterRegistry(self.model)
        self._torch_threads = torch_threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine",
                                            initializer=self._init_worker)
        self.worker_thread: threading.Thread | None = None

    def _init_worker(self) -> None:
        torch.set_num_threads(self._torch_threads if self._torch_threads > 0 else default_torch_threads())
        self.worker_thread = threading.current_thread()

    @staticmethod
    def _call(fn, args, kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)

    async def run(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on the worker thread under inference_mode; await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, args, kwargs))

    def forward(self, inputs: dict, adapters: list[str] | None = None, hidden_states: bool = False) -> dict:
        """One forward pass (worker thread only): {input name: tensor} -> {output name: tensor}."""
        if adapters is not None and not any(adapters):
            adapters = None
        with self.adapters.use(adapters) if adapters else contextlib.nullcontext():
            out = self.model(**inputs, output_hidden_states=hidden_states, return_dict=True)
        result = {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}
        if hidden_states and "last_hidden_state" not in result and out.get("hidden_states") is not None:
            result["last_hidden_state"] = out["hidden_states"][-1]
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
