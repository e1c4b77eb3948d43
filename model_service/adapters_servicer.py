"""splitserve.v1.Adapters: load, unload and list PEFT adapters at run time.

Access (`--adapter-management`):
- `enabled`: anyone who may call the server may manage adapters (the server-wide
  `--auth-token`, when set, already applies to every call);
- `disabled`: LoadAdapter/UnloadAdapter answer PERMISSION_DENIED;
- `token`: LoadAdapter/UnloadAdapter need the token `--adapter-token` (or `--auth-token`
  when no adapter token is set) as `authorization: Bearer <token>` or, when the server-wide
  `--auth-token` already takes `authorization`, as `x-adapter-token: <token>`.
ListAdapters is always allowed: the same names are in the model metadata.

Model changes run on the engine's worker thread; reading the adapter files runs in a
helper thread first, so a large adapter does not hold up forward passes while it loads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from model_service.adapters import BASE_REQUEST_NAME, AdapterInfo, AdapterRegistry, check_name, read_adapter_dir
from splitserve_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    grpc_errors,
)
from splitserve_common.settings import Option
from splitserve_pb import adapters_pb2, adapters_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name
MANAGEMENT_MODES = ("enabled", "disabled", "token")
ADAPTER_TOKEN_HEADER = "x-adapter-token"

ADAPTER_OPTIONS = [
    Option("adapter", [], "PEFT adapter to load at start, as NAME=DIR (repeat the flag for several)",
           repeated=True),
    Option("adapter-management", "enabled", "run-time LoadAdapter/UnloadAdapter: enabled, disabled, or token "
           "(needs the bearer token: --adapter-token, else --auth-token)", choices=MANAGEMENT_MODES),
    Option("adapter-token", "", "bearer token for adapter management when --adapter-management token"),
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
        raise ValueError(f"--adapter {text!r}: expected NAME=DIR")
    return name.strip(), path.strip()


def management_token(mode: str, adapter_token: str, auth_token: str) -> str:
    """The token management calls must carry ('' = none); refuses a `token` mode with no token to check."""
    if mode not in MANAGEMENT_MODES:
        raise ValueError(f"--adapter-management must be one of {', '.join(MANAGEMENT_MODES)}, got {mode!r}")
    if mode != "token":
        return ""
    token = adapter_token or auth_token
    if not token:
        raise ValueError("--adapter-management token needs a token: set --adapter-token or --auth-token")
    return token


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime, mode: str = "enabled", token: str = "", unload_wait: float = 30.0):
        """`runtime`: model_service.runtime.Runtime; its engine holds the registry once ready."""
        self.runtime = runtime
        self.mode = mode
        self.token = token
        self.unload_wait = unload_wait

    def _registry(self) -> AdapterRegistry:
        return self.runtime.require().engine.adapters

    def _authorize(self, context) -> None:
        if self.mode == "disabled":
            raise PermissionDenied("adapter management is disabled on this server (--adapter-management disabled)")
        if self.mode == "token":
            metadata = dict(context.invocation_metadata() or ())
            scheme, _, bearer = metadata.get("authorization", "").partition(" ")
            offered = [bearer.strip()] if scheme.lower() == "bearer" else []
            # With a server-wide --auth-token, `authorization` carries that one: the adapter token
            # then travels in its own header.
            offered.append(metadata.get(ADAPTER_TOKEN_HEADER, "").strip())
            if not any(hmac.compare_digest(given.encode(), self.token.encode()) for given in offered if given):
                raise Unauthenticated("adapter management needs the adapter token: 'authorization: Bearer <token>' "
                                      f"or '{ADAPTER_TOKEN_HEADER}: <token>'")

    @grpc_errors
    async def LoadAdapter(self, request, context):
        self._authorize(context)
        registry = self._registry()
        check_name(request.name)
        if not request.path:
            raise InvalidArgument("LoadAdapter needs 'path': a directory in PEFT format")
        if request.name in registry.names():
            raise FailedPrecondition(f"adapter {request.name!r} is already loaded; unload it first")
        files = await asyncio.to_thread(read_adapter_dir, request.path, registry.allow_pickle)
        info = await self.runtime.engine.run(registry.attach, request.name, files)
        log.info("adapter %s loaded from %s (%s, rank %d, %d bytes)", info.name, info.source, info.method,
                 info.rank, info.weight_bytes)
        return to_proto(info)

    @grpc_errors
    async def UnloadAdapter(self, request, context):
        self._authorize(context)
        registry = self._registry()
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


def own_adapter(args, loaded) -> tuple[str, str] | None:
    """(name, dir) of the model directory's own `peft/` when the loader left it unmerged
    (`loaded.peft_dir`): it is served under the model's name."""
    from model_service.server import served_name  # the server imports this module's plug-in hook

    return (served_name(args), loaded.peft_dir) if loaded.peft_dir else None


def startup_adapters(args, loaded) -> list[tuple[str, str]]:
    """(name, dir) to load at start: the model's own adapter (own_adapter), then every `--adapter NAME=DIR`."""
    try:
        named = [parse_adapter_flag(text) for text in getattr(args, "adapter", None) or []]
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    own = own_adapter(args, loaded)
    return [own, *named] if own else named


def default_adapter(setting: str, args, loaded) -> str:
    """--default-adapter -> the adapter name for requests that name none ("" = the base model)."""
    if setting == "auto":
        own = own_adapter(args, loaded)
        return own[0] if own else ""
    return "" if setting in ("", BASE_REQUEST_NAME) else setting


def register(server, runtime) -> list[str]:
    """Plug-in hook of model_service.server: serve splitserve.v1.Adapters and, once the model is
    loaded, put an AdapterRegistry on the engine and load the adapters named at start."""
    args = runtime.args
    mode = getattr(args, "adapter_management", "enabled")
    try:
        token = management_token(mode, getattr(args, "adapter_token", ""), getattr(args, "auth_token", ""))
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    servicer = AdaptersServicer(runtime, mode=mode, token=token,
                                unload_wait=getattr(args, "adapter_unload_wait", 30.0))
    adapters_pb2_grpc.add_AdaptersServicer_to_server(servicer, server)

    async def on_ready(runtime) -> None:
        engine = runtime.engine
        registry = AdapterRegistry(engine.model, allow_pickle=bool(getattr(args, "allow_pickle", False)))
        engine.adapters = registry
        for name, path in startup_adapters(args, engine.loaded):
            try:
                info = await engine.run(registry.load, name, path)
            except ServiceError as exc:
                raise SystemExit(f"cannot load adapter {name}={path}: {exc.message}") from exc
            log.info("adapter %s loaded from %s (%s, rank %d)", name, path, info.method, info.rank)
        default = default_adapter(getattr(args, "default_adapter", "auto"), args, engine.loaded)
        try:
            registry.set_default(default)
        except ServiceError as exc:
            raise SystemExit(f"--default-adapter {default}: {exc.message}") from exc
        if default:
            log.info("requests that name no adapter use adapter %s (--default-adapter)", default)

    # First: the other plug-ins (generation) pick up engine.adapters when they get ready.
    runtime.on_ready.insert(0, on_ready)
    return [SERVICE_NAME]
