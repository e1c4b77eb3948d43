"""Small v2 tensor clients for model_service: numpy in, numpy out (sync and asyncio).

    with TensorClient("127.0.0.1:8001") as client:
        client.wait_ready()
        out = client.infer({"input_ids": ids, "attention_mask": mask}, outputs=["logits"])
        out["logits"], out.parameters["batch_size"]
        client.metadata().task, client.metadata().default_outputs

Parameters (request-level or per output) are plain Python values: see docs/contracts.md. Requests,
responses and metadata are encoded and decoded by splitserve_common.v2_codec (BF16 outputs arrive
widened to float32).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel_client import AsyncChannelClient, ChannelClient
from splitserve_common.v2_codec import InferResult, ModelMetadata, decode_response, encode_request
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc

_SERVING = health_pb2.HealthCheckResponse.SERVING


class TensorClient(ChannelClient):
    """Blocking client. `address` is host:port (or any grpc target such as dns:///name:port)."""

    def __init__(self, address: str, *, timeout: float | None = 30.0, options=(), credentials=None,
                 metadata=(), channel: grpc.Channel | None = None):
        if channel is not None:  # a prepared channel (e.g. splitserve_common.channels.sync_channel with TLS)
            self.channel = channel
        else:
            self.channel = (grpc.secure_channel(address, credentials, options=list(options)) if credentials
                            else grpc.insecure_channel(address, options=list(options)))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout = timeout
        self.metadata_pairs = tuple(metadata)

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until grpc.health.v1 says SERVING (raises TimeoutError after `timeout` s)."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status == _SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"model service not SERVING after {timeout} s")
            time.sleep(0.1)

    def metadata(self, model_name: str = "") -> ModelMetadata:
        return ModelMetadata.from_response(self.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model_name), timeout=self.timeout, metadata=self.metadata_pairs))

    def infer(self, inputs: dict, outputs=None, parameters=None, output_parameters=None, model_name: str = "",
              request_id: str = "", timeout: float | None = None) -> InferResult:
        request = encode_request(inputs, outputs, parameters, output_parameters, model_name, request_id)
        response = self.stub.ModelInfer(request, timeout=timeout or self.timeout, metadata=self.metadata_pairs)
        return decode_response(response)


class AsyncTensorClient(AsyncChannelClient):
    """asyncio client (grpc.aio); same methods as TensorClient, awaited."""

    def __init__(self, address: str, *, timeout: float | None = 30.0, options=(), credentials=None,
                 metadata=()):
        self.channel = (grpc.aio.secure_channel(address, credentials, options=list(options)) if credentials
                        else grpc.aio.insecure_channel(address, options=list(options)))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.timeout = timeout
        self.metadata_pairs = tuple(metadata)

    async def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == _SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"model service not SERVING after {timeout} s")
            await asyncio.sleep(0.1)

    async def metadata(self, model_name: str = "") -> ModelMetadata:
        return ModelMetadata.from_response(await self.stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model_name), timeout=self.timeout, metadata=self.metadata_pairs))

    async def infer(self, inputs: dict, outputs=None, parameters=None, output_parameters=None,
                    model_name: str = "", request_id: str = "", timeout: float | None = None) -> InferResult:
        request = encode_request(inputs, outputs, parameters, output_parameters, model_name, request_id)
        response = await self.stub.ModelInfer(request, timeout=timeout or self.timeout,
                                              metadata=self.metadata_pairs)
        return decode_response(response)

    async def stream_infer(self, requests):
        """ModelStreamInfer: yield (InferResult or None, error message) per answer, in completion order.

        `requests`: an iterable or async iterable of ModelInferRequest (v2_codec.encode_request).
        """
        call = self.stub.ModelStreamInfer(requests, timeout=self.timeout, metadata=self.metadata_pairs)
        async for answer in call:
            if answer.error_message:
                yield None, answer.error_message
            else:
                yield decode_response(answer.infer_response), ""
