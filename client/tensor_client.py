"""Small v2 tensor clients for model_service: numpy in, numpy out (sync and asyncio).

    with TensorClient("127.0.0.1:8001") as client:
        client.wait_ready()
        out = client.infer({"input_ids": ids, "attention_mask": mask}, outputs=["logits"])
        out["logits"], out.parameters["batch_size"]

Parameters (request-level or per output) are plain Python values: see docs/contracts.md.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.channel_client import AsyncChannelClient, ChannelClient
from splitserve_common import tensors
from splitserve_common.params import set_param, to_dict
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc


class InferResult(dict):
    """{output name: numpy array}, plus the response's `parameters` (e.g. batch_size) and `id`."""

    def __init__(self, outputs: dict, parameters: dict, request_id: str):
        super().__init__(outputs)
        self.parameters = parameters
        self.id = request_id


def build_request(inputs: dict, outputs=None, parameters: dict | None = None,
                  output_parameters: dict | None = None, model_name: str = "",
                  request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_name, id=request_id)
    for name, array in inputs.items():
        datatype, shape, raw = tensors.to_raw(np.asarray(array))
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    for key, value in (parameters or {}).items():
        set_param(request.parameters, key, value)
    output_parameters = output_parameters or {}
    for name in outputs or []:
        out = request.outputs.add(name=name)
        for key, value in output_parameters.get(name, {}).items():
            set_param(out.parameters, key, value)
    return request


def parse_response(response: pb.ModelInferResponse) -> InferResult:
    arrays = {}
    raw = list(response.raw_output_contents)
    for i, out in enumerate(response.outputs):
        array = tensors.decode(out.name, out.datatype, out.shape, raw[i] if raw else None, out.contents)
        arrays[out.name] = array
    return InferResult(arrays, to_dict(response.parameters), response.id)


def metadata_dict(response: pb.ModelMetadataResponse) -> dict:
    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in response.outputs],
        "parameters": to_dict(response.parameters),
    }


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

    def metadata(self, model_name: str = "") -> dict:
        return metadata_dict(self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model_name), timeout=self.timeout,
                                                     metadata=self.metadata_pairs))

    def infer(self, inputs: dict, outputs=None, parameters=None, output_parameters=None, model_name: str = "",
              request_id: str = "", timeout: float | None = None) -> InferResult:
        request = build_request(inputs, outputs, parameters, output_parameters, model_name, request_id)
        response = self.stub.ModelInfer(request, timeout=timeout or self.timeout, metadata=self.metadata_pairs)
        return parse_response(response)


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

    async def metadata(self, model_name: str = "") -> dict:
        return metadata_dict(await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model_name),
                                                           timeout=self.timeout, metadata=self.metadata_pairs))

    async def infer(self, inputs: dict, outputs=None, parameters=None, output_parameters=None,
                    model_name: str = "", request_id: str = "", timeout: float | None = None) -> InferResult:
        request = build_request(inputs, outputs, parameters, output_parameters, model_name, request_id)
        response = await self.stub.ModelInfer(request, timeout=timeout or self.timeout,
                                              metadata=self.metadata_pairs)
        return parse_response(response)

    async def stream_infer(self, requests):
        """ModelStreamInfer: yield (InferResult or None, error message) per answer, in completion order.

        `requests`: an iterable or async iterable of ModelInferRequest (see build_request).
        """
        call = self.stub.ModelStreamInfer(requests, timeout=self.timeout, metadata=self.metadata_pairs)
        async for answer in call:
            if answer.error_message:
                yield None, answer.error_message
            else:
                yield parse_response(answer.infer_response), ""
