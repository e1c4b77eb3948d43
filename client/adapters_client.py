"""Clients for model_service's run-time PEFT adapters (splitserve.v1.Adapters): list, load, unload.

    with AdaptersClient("127.0.0.1:8001", token="s3cret") as adapters:
        adapters.load("support", "/adapters/support")      # AdapterInfo(name, method, rank, ...)
        [a.name for a in adapters.list()]
        adapters.unload("support")

`token` is the adapter-management token when model_service runs with `--adapter-management token`;
it travels as `authorization: Bearer <token>`, or as `x-adapter-token` when the channel already
carries an `authorization` header of its own (`header="x-adapter-token"`). Listing needs no token.
Errors arrive as grpc.RpcError / grpc.aio.AioRpcError with the service's status and message.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from client.channel_client import AsyncChannelClient, ChannelClient
from splitserve_pb import adapters_pb2 as pb
from splitserve_pb import adapters_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"


@dataclass
class AdapterInfo:
    name: str
    method: str              # LORA, IA3, ADALORA
    rank: int
    target_modules: list[str]
    weight_bytes: int
    source: str              # the directory it was loaded from


def _info(message: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(message.name, message.method, message.rank, list(message.target_modules),
                       message.weight_bytes, message.source)


def _metadata(token: str, header: str) -> tuple:
    if not token:
        return ()
    return ((header, f"Bearer {token}" if header == "authorization" else token),)


class AdaptersClient(ChannelClient):
    """Blocking client. `timeout` (seconds) is each call's deadline."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 60.0, channel=None, token: str = "",
                 header: str = "authorization"):
        self.timeout = timeout
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.metadata = _metadata(token, header)

    def list(self) -> list[AdapterInfo]:
        reply = self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout)
        return [_info(a) for a in reply.adapters]

    def load(self, name: str, path: str) -> AdapterInfo:
        """Load the PEFT directory `path` (on the model_service host) as adapter `name`."""
        reply = self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(path)), timeout=self.timeout,
                                      metadata=self.metadata)
        return _info(reply)

    def unload(self, name: str) -> AdapterInfo:
        """Unload `name` once the requests using it are done; returns what was unloaded."""
        reply = self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=self.timeout,
                                        metadata=self.metadata)
        return _info(reply.unloaded)


class AsyncAdaptersClient(AsyncChannelClient):
    """asyncio client: the same methods as AdaptersClient, as coroutines."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = 60.0, channel=None, token: str = "",
                 header: str = "authorization"):
        self.timeout = timeout
        self.channel = channel or grpc.aio.insecure_channel(address)
        self.stub = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.metadata = _metadata(token, header)

    async def list(self) -> list[AdapterInfo]:
        reply = await self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout)
        return [_info(a) for a in reply.adapters]

    async def load(self, name: str, path: str) -> AdapterInfo:
        reply = await self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(path)), timeout=self.timeout,
                                            metadata=self.metadata)
        return _info(reply)

    async def unload(self, name: str) -> AdapterInfo:
        reply = await self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=self.timeout,
                                              metadata=self.metadata)
        return _info(reply.unloaded)
