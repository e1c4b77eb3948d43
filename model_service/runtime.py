"""The served model's state, shared by every servicer in model_service.

The gRPC server starts before the weights are loaded (health answers NOT_SERVING
meanwhile), so servicers are built around a Runtime and read its parts once it is ready:

    runtime.engine    model_service.engine.Engine (run model work with `await engine.run(fn, ...)`)
    runtime.info      model_service.served_model.ServedModel (name, loaded model description, outputs)
    runtime.batcher   model_service.batcher.Batcher (dynamic batching of ModelInfer rows)
    runtime.require() -> the runtime, or errors.Unavailable while loading
"""

from __future__ import annotations

import asyncio

from splitserve_common.errors import Unavailable


class Runtime:
    def __init__(self, args):
        self.args = args
        self.engine = None
        self.info = None
        self.batcher = None
        self.ready = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set()

    def require(self) -> Runtime:
        if not self.ready.is_set():
            raise Unavailable("the model is still loading; wait for health SERVING")
        return self
