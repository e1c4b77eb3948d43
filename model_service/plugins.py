"""Optional servicers that live beside the tensor API (generation, run-time adapters).

Each module in PLUGIN_MODULES that exists in this checkout is imported once; its
`register(server, runtime) -> list[str]` adds its servicers to the grpc.aio server before it
starts and returns their full service names (for health and reflection). It may append
`async def callback(runtime)` to `runtime.on_ready`, run once the model is loaded.
Plug-in flags are listed in model_service/cli.py (OPTIONS).
A module that fails to import is logged and skipped: the tensor API keeps serving.
"""

from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger(__name__)

PLUGIN_MODULES = ["model_service.generation.servicer", "model_service.adapters_servicer"]


@functools.cache
def modules() -> tuple:
    found = []
    for name in PLUGIN_MODULES:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if not (exc.name and name.startswith(exc.name)):
                log.exception("plug-in %s cannot be imported; serving without it", name)
        except Exception:  # noqa: BLE001 - a broken plug-in must not take the tensor API down
            log.exception("plug-in %s cannot be imported; serving without it", name)
    return tuple(found)


def registers() -> list:
    return [module.register for module in modules() if hasattr(module, "register")]
