"""Shared test setup: everything offline, torch on the few cores this machine has, and the two tiers.

Tests that start servers (or other processes) are marked `server` automatically (tests/tiers.py);
`make test-fast` runs the others (`pytest -m "not server"`).
"""

import os

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
    if request.node.get_closest_marker("server") is None:
        tiers.forbid_servers(monkeypatch, request.node.nodeid)
