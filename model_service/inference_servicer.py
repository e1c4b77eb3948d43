"""The Open Inference Protocol (v2) tensor API: inference.GRPCInferenceService on grpc.aio."""

from __future__ import annotations

import logging

from model_service import requests
from model_service.adapters import BASE
from model_service.served_model import metadata
from splitserve_common import v2_codec
from splitserve_common.errors import grpc_errors, status_of
from splitserve_common.streams import ordered_stream
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "splitserve-model-service"
SERVER_VERSION = "0.1.0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime      # model_service.runtime.Runtime: engine, info, batcher once loaded

    @grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.is_ready)

    @grpc_errors
    async def ModelReady(self, request, context):
        if self.runtime.is_ready:
            requests.check_model_name(self.runtime.info, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.runtime.is_ready)

    @grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_stream_infer", "splitserve_shaping"])

    @grpc_errors
    async def ModelMetadata(self, request, context):
        info = self.runtime.require().info
        requests.check_model_name(info, request.name, request.version)
        return metadata(info).to_response()

    @grpc_errors
    async def ModelInfer(self, request, context):
        return await self.infer(request, context.time_remaining())

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request is answered by one response (result or error_message), in request order,
        with at most --stream-window requests of one stream in flight (splitserve_common/streams.py)."""
        async def answer(req):
            try:
                return pb.ModelStreamInferResponse(infer_response=await self.infer(req, context.time_remaining()))
            except Exception as exc:  # noqa: BLE001 - reported in the stream, the stream goes on
                code, message = status_of(exc)
                response = pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}")
                response.infer_response.id = req.id
                response.infer_response.model_name = req.model_name
                return response

        async for response in ordered_stream(request_iterator, answer, self.runtime.args.stream_window):
            yield response

    async def infer(self, request, timeout: float | None) -> pb.ModelInferResponse:
        runtime = self.runtime.require()
        info = runtime.info
        job = requests.parse(request, info)
        # The lease makes an adapter unload wait for this request, and names the adapter meant. The base
        # model is "" for the batcher: rows without an adapter run on the forward workers, beside each other.
        with runtime.engine.adapters.lease(job.adapter) as leased:
            job.adapter = "" if leased == BASE else leased
            result = await runtime.batcher.submit(job, timeout)
        return v2_codec.encode_response(result.outputs, model_name=info.name, model_version=info.versions[0],
                                        request_id=request.id, parameters={"batch_size": result.batch_size})
