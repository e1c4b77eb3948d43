"""tests/tiers.py: the `server` marker follows what a test reaches, through fixtures and helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import preproc_helpers, tiers


def _through_a_helper(tmp_path):
    with preproc_helpers.stack(tmp_path):  # tests.preproc_helpers.stack -> tests.servers
        pass


def _helper_without_servers(tmp_path):
    preproc_helpers.build_task_model(tmp_path, "fill-mask")


def _imports_inside(tmp_path):
    import subprocess as sp

    sp.run(["true"])


def _picks_fixtures_by_name(request):
    request.getfixturevalue("gpt2")


def test_reading_code_finds_servers_reached_through_helpers():
    assert tiers.starts_servers(_through_a_helper)
    assert tiers.starts_servers(_imports_inside)
    assert tiers.starts_servers(_picks_fixtures_by_name)
    assert not tiers.starts_servers(_helper_without_servers)


def test_this_module_is_in_the_fast_tier(request):
    assert request.node.get_closest_marker("server") is None


def test_the_guard_refuses_python_processes_and_grpc_servers(monkeypatch):
    tiers.forbid_servers(monkeypatch, "this test")  # what conftest does for every unmarked test
    subprocess.run(["true"], check=True)  # other programs still run
    with pytest.raises(tiers.ServerInUnitTest, match="mark the test @pytest.mark.server"):
        subprocess.run([sys.executable, "-c", "pass"])
    import grpc

    with pytest.raises(tiers.ServerInUnitTest):
        grpc.aio.server()
