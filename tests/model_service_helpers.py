"""Shared pieces of the model_service tests: tiny model directories, servers started together,
in-process reference forward passes."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from grpc_health.v1 import health_pb2

from tests import model_factory, servers

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

TASKS = model_factory.TASKS
SENTENCES = model_factory.SENTENCES
PAIRS = [("who is in paris?", "Alice lives in Paris with Bob."), ("what?", "the river is long and the forest is old")]


async def until(predicate, what: str, seconds: float = 30.0, poll: float = 0.01, failed=()) -> None:
    """Poll `predicate` on the event loop until it holds; fail naming `what` after `seconds`, or at once
    with the error of any future in `failed` that ended meanwhile (the calls the state waited for were
    refused). No wait in a test may be unbounded: one that could never end once held CI for 80 minutes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        for future in failed:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise AssertionError(f"while waiting for {what}") from future.exception()
        assert loop.time() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(poll)


def build_task_models(root: Path) -> dict:
    """task -> (components dir, model, tokenizer), each saved in the MLflow components layout."""
    built = {}
    for i, task in enumerate(TASKS):
        model, tokenizer = model_factory.build_encoder(task, seed=i)
        directory = model_factory.save_components(root / task, model, tokenizer, task)
        built[task] = (directory, model, tokenizer)
    return built


def encode(tokenizer, task: str) -> dict[str, np.ndarray]:
    """Right-padded int64 inputs as the preproc service would send them."""
    if task == "question-answering":
        enc = tokenizer([q for q, _ in PAIRS], [c for _, c in PAIRS], padding=True, return_tensors="np")
    else:
        enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def reference(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In-process forward on the same padded batch: {output name: array}."""
    import torch

    with torch.inference_mode():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=True)
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def masked(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero positions past each row's length (as the service returns them)."""
    shape = mask.shape + (1,) * (array.ndim - 2)
    return array * mask.reshape(shape)


@contextmanager
def model_services(specs: dict, log_dir: Path | None = None):
    """Start several model services at once; {key: ServiceProcess} once all are SERVING.

    specs: key -> (model dir, [extra args]). Each handle gets `.statuses`: the health
    statuses seen while it started (None = not listening yet), in order.
    """
    with ExitStack() as stack:
        handles = {}
        for key, (directory, extra) in specs.items():
            handles[key] = stack.enter_context(servers.model_service(
                directory, "--metrics-port", "0", *extra, wait=False, log_dir=log_dir))
            handles[key].statuses = []
        deadline = time.monotonic() + servers.START_SECONDS
        waiting = set(handles)
        while waiting:
            for key in list(waiting):
                handle = handles[key]
                if handle.proc.poll() is not None:
                    raise RuntimeError(f"model service {key} exited:\n{handle.log()}")
                status = servers.health_status(handle.address, timeout=0.5)
                if not handle.statuses or handle.statuses[-1] != status:
                    handle.statuses.append(status)
                if status == SERVING:
                    waiting.discard(key)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING: {sorted(waiting)}")
            time.sleep(0.05)
        yield handles
