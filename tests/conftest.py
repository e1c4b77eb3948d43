"""Shared test setup: everything offline, torch on the few cores this machine has, and the two tiers.

Tests that start servers (or other processes) are marked `server` automatically (tests/tiers.py);
`make test-fast` runs the others (`pytest -m "not server"`).
"""

import os
import sys

import pytest

from tests import tiers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and tiers.item_starts_servers(item):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_servers(request, monkeypatch):
    if request.node.get_closest_marker("server") is not None:
        yield
        return
    tiers.forbid_servers(monkeypatch, request.node.nodeid)
    # Unit tests compare in-process results with in-process references, so they run torch on one
    # thread: on a small shared machine intra-op threads spinning on each other slow tiny models
    # by an order of magnitude. (Server tests keep the thread count their services use.)
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    yield
    if torch:
        torch.set_num_threads(before)
