"""splitserve.v1.Adapters: load, unload and list PEFT adapters at run time.

Safe by default on an open network (docs/adapters.md, "Access"):
- `--adapter-management disabled` (default): LoadAdapter/UnloadAdapter answer PERMISSION_DENIED;
  only the adapters named at start are served.
- `--adapter-management token`: LoadAdapter/UnloadAdapter need the token `--adapter-token` (or
  `--auth-token` when no adapter token is set) as `authorization: Bearer <token>` or, when the
  server-wide `--auth-token` already takes `authorization`, as `x-adapter-token: <token>`.
  Loads are confined to `--adapter-root` (required in this mode): the path, resolved with its
  symlinks and `..`, must stay under it, and one outside it is refused the same way whether or
  not it exists. At most `--max-adapters` adapters are loaded. The adapters loaded at start
  (`--adapter`, the MLflow model's own `peft/`) cannot be unloaded through the API.
ListAdapters is always allowed: the same names are in the model metadata.

Model changes run on the engine's worker thread; reading the adapter files runs in a
helper thread first, so a large adapter does not hold up forward passes while it loads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path

from model_service.adapters import BASE_REQUEST_NAME, AdapterInfo, AdapterRegistry, check_name, read_adapter_dir
from splitserve_common.errors import (
    ConfigurationError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    grpc_errors,
)
from splitserve_common.settings import Option
from splitserve_pb import adapters_pb2, adapters_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
MANAGEMENT_MODES = ("disabled", "token")
ADAPTER_TOKEN_HEADER = "x-adapter-token"

ADAPTER_OPTIONS = [
    Option("adapter", [], "PEFT adapter to load at start, as NAME=DIR (repeat the flag for several); these "
           "cannot be unloaded through the API", repeated=True),
    Option("adapter-management", "disabled", "run-time LoadAdapter/UnloadAdapter: disabled, or token (needs a "
           "token, --adapter-token else --auth-token, and --adapter-root)", choices=MANAGEMENT_MODES),
    Option("adapter-token", "", "bearer token for adapter management when --adapter-management token"),
    Option("adapter-root", "", "directory LoadAdapter may read adapters from (paths are resolved, symlinks and "
           "'..' included, and must stay under it); required with --adapter-management token"),
    Option("max-adapters", 16, "most adapters loaded at once; LoadAdapter beyond it is RESOURCE_EXHAUSTED", int),
    Option("adapter-unload-wait", 30.0, "seconds an unload waits for requests still using the adapter", float),
    Option("default-adapter", "auto", "adapter for requests that name none: auto (the MLflow model's own peft/ "
           "adapter when it has one, else the base model), base, or a loaded adapter's name"),
]


def to_proto(info: AdapterInfo) -> adapters_pb2.AdapterInfo:
    return adapters_pb2.AdapterInfo(name=info.name, method=info.method, rank=info.rank,
                                    target_modules=list(info.target_modules), weight_bytes=info.weight_bytes,
                                    source=info.source)


def parse_adapter_flag(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigurationError(f"--adapter {text!r}: expected NAME=DIR")
    return name.strip(), path.strip()


def management_token(mode: str, adapter_token: str, auth_token: str) -> str:
    """The token management calls must carry ('' = management disabled)."""
    if mode not in MANAGEMENT_MODES:
        raise ConfigurationError(f"--adapter-management must be one of {', '.join(MANAGEMENT_MODES)}, got {mode!r}")
    if mode == "disabled":
        return ""
    token = adapter_token or auth_token
    if not token:
        raise ConfigurationError("--adapter-management token needs a token: set --adapter-token or --auth-token")
    return token


def adapter_root(mode: str, root: str) -> Path | None:
    """The resolved --adapter-root (None when management is disabled); token mode needs one."""
    if mode == "disabled":
        return None
    if not root:
        raise ConfigurationError("--adapter-management token needs --adapter-root: the directory run-time loads "
                                 "may read")
    resolved = Path(root).resolve()
    if not resolved.is_dir():
        raise ConfigurationError(f"--adapter-root {root!r} is not a directory")
    return resolved


def confined(root: Path, path: str) -> Path:
    """`path` (absolute, or relative to `root`) resolved, symlinks and '..' included; PERMISSION_DENIED
    when that leaves `root`. Whether the path exists is not looked at here, so the answer for a
    path outside the root says nothing about it."""
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise PermissionDenied(f"adapter path {path!r} is outside the adapter root (--adapter-root)")
    return resolved


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime, token: str = "", root: Path | None = None, max_adapters: int = 16,
                 unload_wait: float = 30.0, allow_pickle: bool = False):
        """`runtime`: model_service.runtime.Runtime; its engine holds the registry once ready.
        `token` "" disables management; otherwise loads read only under `root`."""
        self.runtime = runtime
        self.token = token
        self.root = root
        self.max_adapters = max_adapters
        self.unload_wait = unload_wait
        self.allow_pickle = allow_pickle
        self.pinned: set[str] = set()  # loaded at start: not unloadable through the API

    def _registry(self) -> AdapterRegistry:
        return self.runtime.require().engine.adapters

    def _authorize(self, context) -> None:
        if not self.token:
            raise PermissionDenied("adapter management is disabled on this server (--adapter-management)")
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, bearer = metadata.get("authorization", "").partition(" ")
        offered = [bearer.strip()] if scheme.lower() == "bearer" else []
        # With a server-wide --auth-token, `authorization` carries that one: the adapter token
        # then travels in its own header.
        offered.append(metadata.get(ADAPTER_TOKEN_HEADER, "").strip())
        if not any(hmac.compare_digest(given.encode(), self.token.encode()) for given in offered if given):
            raise Unauthenticated("adapter management needs the adapter token: 'authorization: Bearer <token>' "
                                  f"or '{ADAPTER_TOKEN_HEADER}: <token>'")

    def _check_room(self, registry: AdapterRegistry) -> None:
        loaded = len(registry.names())
        if loaded >= self.max_adapters:
            raise ResourceExhausted(f"{loaded} adapters are loaded, the limit (--max-adapters {self.max_adapters}); "
                                    "unload one first")

    @grpc_errors
    async def LoadAdapter(self, request, context):
        self._authorize(context)
        registry = self._registry()
        check_name(request.name)
        if not request.path:
            raise InvalidArgument("LoadAdapter needs 'path': a directory in PEFT format under the adapter root")
        path = confined(self.root, request.path)
        if request.name in registry.names():
            raise FailedPrecondition(f"adapter {request.name!r} is already loaded; unload it first")
        self._check_room(registry)
        files = await asyncio.to_thread(read_adapter_dir, path, self.allow_pickle)

        def attach():  # on the worker thread, one load at a time: the limit holds under concurrent loads
            self._check_room(registry)
            return registry.attach(request.name, files)

        info = await self.runtime.engine.run(attach)
        log.info("adapter %s loaded from %s (%s, rank %d, %d bytes)", info.name, info.source, info.method,
                 info.rank, info.weight_bytes)
        return to_proto(info)

    @grpc_errors
    async def UnloadAdapter(self, request, context):
        self._authorize(context)
        registry = self._registry()
        if request.name in self.pinned:
            raise FailedPrecondition(f"adapter {request.name!r} was loaded at start (--adapter or the model's own "
                                     "peft/); restart without it to remove it")
        registry.begin_unload(request.name)  # new requests for it now get NOT_FOUND
        done = False
        try:
            deadline = time.monotonic() + self.unload_wait
            while registry.in_use(request.name):
                if time.monotonic() >= deadline:
                    raise FailedPrecondition(f"adapter {request.name!r} is still used by "
                                             f"{registry.in_use(request.name)} request(s) after "
                                             f"{self.unload_wait:.0f} s; try again later")
                await asyncio.sleep(0.01)
            info = await self.runtime.engine.run(registry.unload, request.name)
            done = True
        finally:
            if not done:
                registry.cancel_unload(request.name)
        log.info("adapter %s unloaded", info.name)
        return adapters_pb2.UnloadAdapterResponse(unloaded=to_proto(info))

    @grpc_errors
    async def ListAdapters(self, request, context):
        return adapters_pb2.ListAdaptersResponse(adapters=[to_proto(i) for i in self._registry().list()])

    async def on_ready(self, runtime) -> None:
        """Once the model is loaded: load the adapters named at start, then set the default adapter."""
        args, engine = runtime.args, runtime.engine
        registry = engine.adapters
        for name, path in startup_adapters(args, engine.loaded):
            try:
                info = await engine.run(registry.load, name, path, self.allow_pickle)
            except ServiceError as exc:
                raise ConfigurationError(f"cannot load adapter {name}={path}: {exc.message}") from exc
            self.pinned.add(name)
            log.info("adapter %s loaded from %s (%s, rank %d)", name, path, info.method, info.rank)
        default = default_adapter(args.default_adapter, args, engine.loaded)
        try:
            registry.set_default(default)
        except ServiceError as exc:
            raise ConfigurationError(f"--default-adapter {default}: {exc.message}") from exc
        if default:
            log.info("requests that name no adapter use adapter %s (--default-adapter)", default)


def own_adapter(args, loaded) -> tuple[str, str] | None:
    """(name, dir) of the model directory's own `peft/` when the loader left it unmerged
    (`loaded.peft_dir`): it is served under the model's name."""
    from model_service.server import served_name  # the server imports this module's plug-in hook

    return (served_name(args), loaded.peft_dir) if loaded.peft_dir else None


def startup_adapters(args, loaded) -> list[tuple[str, str]]:
    """(name, dir) to load at start: the model's own adapter (own_adapter), then every `--adapter NAME=DIR`."""
    named = [parse_adapter_flag(text) for text in args.adapter]
    own = own_adapter(args, loaded)
    return [own, *named] if own else named


def default_adapter(setting: str, args, loaded) -> str:
    """--default-adapter -> the adapter name for requests that name none ("" = the base model)."""
    if setting == "auto":
        own = own_adapter(args, loaded)
        return own[0] if own else ""
    return "" if setting in ("", BASE_REQUEST_NAME) else setting


def register(server, runtime) -> AdaptersServicer:
    """Serve splitserve.v1.Adapters (SERVICE_NAME) on `server`; server.py calls the servicer's `on_ready`
    once the model is loaded, to load the adapters named at start. Raises ConfigurationError."""
    args = runtime.args
    token = management_token(args.adapter_management, args.adapter_token, args.auth_token)
    servicer = AdaptersServicer(runtime, token=token, root=adapter_root(args.adapter_management, args.adapter_root),
                                max_adapters=args.max_adapters, unload_wait=args.adapter_unload_wait,
                                allow_pickle=args.allow_pickle)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(servicer, server)
    return servicer
