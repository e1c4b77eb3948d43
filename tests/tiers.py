"""Which tests start servers or other processes: the `server` marker is derived, never hand-written.

A test starts a server when its function, or any fixture it uses, reaches (through helpers in
tests/) one of SERVER_MODULES: `tests.servers`, `subprocess`, or the services' in-process
`server` modules. `conftest.py` marks such tests `server`; `make test-fast` runs the rest.
What static reading cannot see, `forbid_servers` catches at run time in the fast tier: an
unmarked test that spawns Python or builds a gRPC server fails, naming the fix.
"""

from __future__ import annotations

import inspect
import sys
import types

import grpc

SERVER_MODULES = frozenset({"tests.servers", "subprocess", "multiprocessing", "model_service.server",
                            "preproc_service.server", "splitserve_common.serving"})
# A test that picks fixtures by name at run time may start any of them.
DYNAMIC_FIXTURES = "getfixturevalue"


def _code_names(code: types.CodeType) -> set[str]:
    """Every global, attribute and imported-module name a code object and its nested ones use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _targets(obj) -> list:
    """The functions to read for `obj`: itself, or every method of a class."""
    obj = inspect.unwrap(obj) if callable(obj) else obj
    if inspect.isclass(obj):
        return [m for m in vars(obj).values() if inspect.isfunction(m)]
    return [obj] if inspect.isfunction(obj) else []


def _local(obj) -> bool:
    return (getattr(obj, "__module__", "") or "").startswith("tests.")


def starts_servers(obj, _seen: set | None = None) -> bool:
    """True when calling `obj` (a test or fixture function, or a helper class) may start a server."""
    seen = set() if _seen is None else _seen
    for func in _targets(obj):
        if func in seen:
            continue
        seen.add(func)
        names = _code_names(func.__code__)
        if names & SERVER_MODULES or DYNAMIC_FIXTURES in names:
            return True
        for name in names:
            value = func.__globals__.get(name)
            if isinstance(value, types.ModuleType):
                if value.__name__ in SERVER_MODULES:
                    return True
                if value.__name__.startswith("tests.") and value.__name__ != __name__:  # a helper: follow it
                    for attr in names:
                        member = getattr(value, attr, None)
                        if _local(member) and starts_servers(member, seen):
                            return True
            elif getattr(value, "__module__", None) in SERVER_MODULES:
                return True
            elif _local(value) and starts_servers(value, seen):
                return True
    return False


def item_starts_servers(item) -> bool:
    """For a collected pytest item: its test function or any fixture in its closure starts a server."""
    if starts_servers(item.obj):
        return True
    for defs in item._fixtureinfo.name2fixturedefs.values():
        if any(starts_servers(d.func) for d in defs):
            return True
    return False


class ServerInUnitTest(RuntimeError):
    pass


def forbid_servers(monkeypatch, nodeid: str) -> None:
    """Make spawning a Python process or building a gRPC server fail inside an unmarked test."""
    import subprocess

    def refuse(what):
        raise ServerInUnitTest(f"{nodeid} {what} but is not marked 'server': tests/tiers.py did not see it; "
                               "mark the test @pytest.mark.server")

    real_init = subprocess.Popen.__init__

    def popen_init(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        if argv and str(argv[0]) == sys.executable:
            refuse(f"starts a Python process ({' '.join(map(str, argv[:3]))} ...)")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    monkeypatch.setattr(grpc, "server", lambda *a, **k: refuse("builds a gRPC server"))
    monkeypatch.setattr(grpc.aio, "server", lambda *a, **k: refuse("builds a gRPC server"))
