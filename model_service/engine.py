"""The one owner of the model: model work runs on its worker threads, never on the event loop.

API for the other parts of model_service (generation, adapters, batching) — keep it stable:

    engine = Engine(loaded, torch_threads=0, forward_workers=1, backend="eager",   # loaded: loader.LoadedModel
                    release_memory_seconds=0.0)
    result = await engine.run(fn, *args, **kwargs)
        Runs `fn(*args, **kwargs)` on the engine's main worker thread under torch.inference_mode()
        and returns its result (exceptions propagate). Calls run one at a time, in submission
        order, and no forward worker runs meanwhile, so `fn` may touch the model (forward,
        generate step, load/unload an adapter) without locks. The main worker has every forward
        worker's torch threads (torch_threads x forward_workers): the batcher also runs a lone
        forward pass here (nothing else to compute: batcher.py, "Lone passes"). Never call
        engine.run from inside `fn` (it would wait on itself).
    result = await engine.run_forward(fn, *args, **kwargs)
        For work that only reads the model (the batcher's forward passes without adapters): with
        `forward_workers` > 1 it runs on one of that many threads, beside the others, each with
        `torch_threads` intra-op threads (several smaller forwards use a CPU node better than one
        wide one); with one worker it is `run`.
    result = await engine.run_bulk_forward(fn, *args, **kwargs)
        As run_forward, for the batcher's passes for long requests: with `bulk_nice` > 0 (and two or
        more forward workers) on `forward_workers` threads of their own whose nice value is raised by
        `bulk_nice` (splitserve_common/priority.py), so that a short request's pass computing beside
        them gets most of the CPU; otherwise the same as run_forward.
    engine.model, engine.device, engine.dtype, engine.loaded
    engine.forward_workers, engine.torch_threads (per forward worker), engine.cpus (this process may use)
    engine.forward(inputs, adapters=None, hidden_states=False)   # worker threads only
        One forward pass of the model on a dict of tensors (already on engine.device), run by the
        engine's backend (model_service/backends.py: eager PyTorch, or another engine behind the
        same call); `adapters`: one adapter name per row ("" = base model), None = all base.
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
from model_service.backends import BACKENDS
from splitserve_common.errors import FailedPrecondition
from splitserve_common.memory import MemoryReleaser
from splitserve_common.priority import check_nice, raise_thread_nice


def default_torch_threads() -> int:
    """Every CPU this process may use (split between the forward workers): a replica uses its node's cores.

    On a node shared with busy processes, threads per worker above one spin at the end of every parallel
    region: see "Threads and wait policy" in docs/model_service.md for the measured trade-off.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_forward_workers(device: str, cpus: int) -> int:
    """Forward workers when --forward-workers is 0: on a CPU node two workers share the cores
    (as Triton's default CPU instance group does), one on a GPU or a single core.

    Measured in process on 2 cores, length-sorted batches of 16: two workers with one torch thread
    each gave 1.15x and 1.5x the sentences/s of one worker with two threads (issue 13)."""
    return 1 if device != "cpu" or cpus < 2 else 2


class _SharedOrAlone:
    """Forward passes on several workers share the model; other model work (engine.run) runs alone.
    A waiting `alone` goes before new `shared` entries, so model changes are not starved."""

    def __init__(self):
        self._changed = threading.Condition()
        self._sharing = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.contextmanager
    def shared(self):
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def alone(self):
        with self._changed:
            self._waiting_alone += 1
            self._changed.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


class Engine:
    def __init__(self, loaded, torch_threads: int = 0, forward_workers: int = 1, backend="eager",
                 release_memory_seconds: float = 0.0, bulk_nice: int = 0):
        """`forward_workers`: threads that run batched forward passes at once (0: default_forward_workers);
        `torch_threads`: torch's intra-op threads per worker (0: the process's CPUs split between them);
        `backend`: a name in backends.BACKENDS, or a backend built already (backends.py's interface);
        `release_memory_seconds`: after model work, hand the allocator's free memory back to the system at
        most this often (0: never; see splitserve_common/memory.py: tensors of ever-changing shapes
        fragment glibc's arenas, and RSS grew without bound under varied batches); `bulk_nice`: see
        run_bulk_forward (0: long requests' passes run on the forward workers)."""
        check_nice("forward-bulk-nice", bulk_nice)
        self.loaded = loaded
        self.model = loaded.model
        self.backend = BACKENDS[backend](loaded) if isinstance(backend, str) else backend
        self.device = torch.device(loaded.device)
        self.dtype = getattr(torch, loaded.dtype)
        self.adapters = AdapterRegistry(self.model)
        self.cpus = default_torch_threads()  # the CPUs this process may use
        self.forward_workers = forward_workers or default_forward_workers(self.device.type, self.cpus)
        self.torch_threads = torch_threads or max(1, self.cpus // self.forward_workers)
        # The main worker runs alone (no forward worker meanwhile): it may use every worker's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine", initializer=self._init_worker,
                                            initargs=(self.torch_threads * self.forward_workers, True))
        self._forward_executor = None if self.forward_workers == 1 else ThreadPoolExecutor(
            max_workers=self.forward_workers, thread_name_prefix="forward", initializer=self._init_worker,
            initargs=(self.torch_threads, False))
        self._bulk_executor = None if self._forward_executor is None or not bulk_nice else ThreadPoolExecutor(
            max_workers=self.forward_workers, thread_name_prefix="forward-bulk", initializer=self._init_worker,
            initargs=(self.torch_threads, False, bulk_nice))
        self._model_use = _SharedOrAlone()
        self.memory = MemoryReleaser(release_memory_seconds)
        self.worker_thread: threading.Thread | None = None

    def _init_worker(self, threads: int, main: bool, nice: int = 0) -> None:
        raise_thread_nice(nice)  # before torch's threads for it start: they inherit the nice value
        torch.set_num_threads(threads)  # torch keeps the count per thread (OpenMP)
        if main:
            self.worker_thread = threading.current_thread()

    def _call(self, fn, args, kwargs):
        with self._model_use.alone() if self._forward_executor else contextlib.nullcontext(), \
                torch.inference_mode():
            try:
                return fn(*args, **kwargs)
            finally:
                self.memory.worked()

    def _call_shared(self, fn, args, kwargs):
        with self._model_use.shared(), torch.inference_mode():
            try:
                return fn(*args, **kwargs)
            finally:
                self.memory.worked()

    async def run(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) on the worker thread under inference_mode; await its result.
        No forward pass of another worker runs meanwhile, so `fn` may change the model."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, fn, args, kwargs))

    async def run_forward(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs), which only reads the model (a batched forward pass without adapters),
        on one of the forward workers, beside the others; with one worker, the same as `run`."""
        if self._forward_executor is None:
            return await self.run(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._forward_executor,
                                          functools.partial(self._call_shared, fn, args, kwargs))

    async def run_bulk_forward(self, fn, *args, **kwargs):
        """run_forward for long requests' passes: on the niced forward workers when there are any."""
        if self._bulk_executor is None:
            return await self.run_forward(fn, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._bulk_executor, functools.partial(self._call_shared, fn, args, kwargs))

    def forward(self, inputs: dict, adapters: list[str] | None = None, hidden_states: bool = False) -> dict:
        """One forward pass (worker thread only): {input name: tensor} -> {output name: tensor}."""
        if adapters is not None and not any(adapters):
            adapters = None
        if adapters and not self.backend.supports_adapters:
            raise FailedPrecondition(f"the {type(self.backend).__name__} engine cannot apply adapters")
        if not adapters:
            return self.backend(inputs, hidden_states)
        # Adapter hooks apply row i's adapter to row i of a padded batch: a padding-free backend gives way.
        backend = getattr(self.backend, "padded", self.backend)
        with self.adapters.use(adapters):
            return backend(inputs, hidden_states)

    def close(self) -> None:
        self.memory.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        for executor in (self._forward_executor, self._bulk_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
