"""Keep torch out of the preproc process.

preproc_service never needs torch, but transformers imports it as soon as it is
installed in the same environment (its availability check runs at import time),
costing hundreds of MiB and seconds of start-up per preproc replica. The service
entry point therefore hides torch before transformers loads: to the process it
looks exactly like a node without torch installed.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

# transformers says this at import on every start of a node without torch: expected here, not news.
NO_TORCH_NOTICE = "PyTorch was not found."


class DropNoTorchNotice(logging.Filter):
    """Drops transformers' no-torch notice, and only it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "transformers" and record.getMessage().startswith(NO_TORCH_NOTICE))


class HideTorch(importlib.abc.MetaPathFinder):
    """In front of the real finders: no torch module, no torch distribution."""

    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        for finder in self.finders:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):
        for finder in self.finders:
            find = getattr(finder, "find_distributions", None)
            if find is not None:
                for dist in find(*args, **kwargs):
                    if (dist.metadata["Name"] or "").lower() != "torch":
                        yield dist


def hide_torch() -> None:
    """Install the guard (idempotent). Must run before transformers is imported."""
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported; hide_torch() must run first")
    if not any(isinstance(f, HideTorch) for f in sys.meta_path):
        sys.meta_path[:] = [HideTorch(list(sys.meta_path))]
    transformers_log = logging.getLogger("transformers")  # the logger transformers' own logging uses
    if not any(isinstance(f, DropNoTorchNotice) for f in transformers_log.filters):
        transformers_log.addFilter(DropNoTorchNotice())
