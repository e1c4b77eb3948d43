"""Shared test setup: everything offline, torch on the few cores this machine has, and the two tiers.

Tests that start servers (or other processes) are marked `server` automatically (tests/tiers.py);
`make test-fast` runs the others (`pytest -m "not server"`).
"""

import os
import sys

import pytest

from tests import tiers
from tests.servers import TORCH_THREADS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and tiers.item_starts_servers(item):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def _torch_threads_of_the_services():
    """In-process references run on as many torch threads as the services the tests start
    (tests/servers.py TORCH_THREADS), so both split their reductions alike; set before each test,
    since an in-process server's engine sets the (process-wide) count for its worker."""
    torch = sys.modules.get("torch")  # imported by the test modules collected, if any uses it
    if torch is not None and torch.get_num_threads() != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_servers(request, monkeypatch):
    if request.node.get_closest_marker("server") is None:
        tiers.forbid_servers(monkeypatch, request.node.nodeid)
