"""Adapter management is safe by default (issue 12, item 9), against a real model_service: off
unless turned on with a token, loads confined to --adapter-root (symlinks and '..' resolved),
the same answer whether or not a path outside it exists, a cap on loaded adapters, and the
adapters loaded at start not unloadable through the API."""

from __future__ import annotations

import shutil

import grpc
import pytest

from splitserve_pb import adapters_pb2, adapters_pb2_grpc
from tests import adapter_helpers as ah
from tests import model_factory as mf
from tests import servers

SERVER_ARGS = ("--metrics-port", "0", "--torch-threads", "1")
MAX_ADAPTERS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("robust_adapters")
    base, tok = mf.build_encoder("text-classification")
    model_dir = mf.save_components(work / "model", base, tok, "text-classification")
    root = work / "root"
    dirs = ah.save_adapters(base, root, ah.ENCODER_ADAPTERS)                    # alpha, beta, gamma
    outside = ah.save_lora(base, work / "outside" / "delta", *ah.ENCODER_ADAPTERS["alpha"])
    (root / "link").symlink_to(outside)                                         # in the root, points out
    with servers.model_service(model_dir, *SERVER_ARGS, "--adapter", f"alpha={dirs['alpha']}",
                               "--max-adapters", str(MAX_ADAPTERS), *ah.management_flags(root)) as server:
        yield {"server": server, "root": root, "dirs": dirs, "outside": outside, "work": work}


def stub_of(env):
    return adapters_pb2_grpc.AdaptersStub(grpc.insecure_channel(env["server"].address))


def load_error(stub, name: str, path) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=name, path=str(path)), metadata=ah.TOKEN_METADATA)
    return caught.value


def names(stub) -> list[str]:
    return [a.name for a in stub.ListAdapters(adapters_pb2.ListAdaptersRequest()).adapters]


def test_loads_outside_the_root_are_refused_alike_whether_or_not_the_path_exists(env):
    stub = stub_of(env)
    outside, root = env["outside"], env["root"]
    attempts = {
        "absolute path outside": outside,
        "'..' out of the root": root / ".." / "outside" / "delta",
        "relative '..'": "../outside/delta",
        "symlink in the root": root / "link",
        "missing path outside": env["work"] / "outside" / "nothing-here",
        "missing system path": "/nonexistent/adapter",
    }
    messages = {}
    for label, path in attempts.items():
        error = load_error(stub, "delta", path)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (label, error.details())
        messages[label] = error.details().replace(repr(str(path)), "PATH")
    assert len(set(messages.values())) == 1, messages  # nothing tells an existing path from a missing one
    assert "--adapter-root" in messages["symlink in the root"]
    assert "delta" not in names(stub)
    # Inside the root, relative and absolute paths load.
    assert stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name="beta", path="beta"),
                            metadata=ah.TOKEN_METADATA).source == str(env["dirs"]["beta"].resolve())
    stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="beta"), metadata=ah.TOKEN_METADATA)


def test_adapters_loaded_at_start_cannot_be_unloaded_through_the_api(env):
    stub = stub_of(env)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name="alpha"), metadata=ah.TOKEN_METADATA)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "loaded at start" in caught.value.details()
    assert "alpha" in names(stub)


def test_loaded_adapters_are_capped(env):
    stub = stub_of(env)
    copies = [shutil.copytree(env["dirs"]["gamma"], env["root"] / f"copy{i}") for i in range(MAX_ADAPTERS)]
    loaded = []
    try:
        for i, path in enumerate(copies[: MAX_ADAPTERS - 1]):  # alpha (at start) + these = the limit
            stub.LoadAdapter(adapters_pb2.LoadAdapterRequest(name=f"copy{i}", path=str(path)),
                             metadata=ah.TOKEN_METADATA)
            loaded.append(f"copy{i}")
        error = load_error(stub, "one-more", copies[-1])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert f"--max-adapters {MAX_ADAPTERS}" in error.details()
        assert len(names(stub)) == MAX_ADAPTERS
    finally:
        for name in loaded:
            stub.UnloadAdapter(adapters_pb2.UnloadAdapterRequest(name=name), metadata=ah.TOKEN_METADATA)


def test_token_mode_needs_an_adapter_root(tmp_path):
    model_dir = mf.save_components(tmp_path / "model", *mf.build_encoder("text-classification"),
                                   "text-classification")
    with servers.model_service(model_dir, *SERVER_ARGS, "--adapter-management", "token", "--adapter-token", "t",
                               wait=False) as server:
        assert server.proc.wait(120) == 2
        log = server.log()
    assert "model-service: --adapter-management token needs --adapter-root" in log
    assert "Traceback" not in log
