"""The channel from preproc to model_service (Open Inference Protocol v2).

- keepalive pings, so a dead peer is noticed on idle connections;
- UNAVAILABLE is retried by gRPC itself (service config retryPolicy), with backoff;
- `dns:///name:port` targets resolve to every replica, balanced per call by round_robin
  (one HTTP/2 connection would pin every call to one pod);
- the caller's remaining deadline becomes the model call's timeout, and cancelling
  the awaiting task cancels the model call (grpc.aio propagates asyncio cancellation);
- at most `max_in_flight` model calls at once; the rest wait their turn;
- each call carries the request id (and trace context) of the request it serves.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from splitserve_common import call_context, v2_codec
from splitserve_common.channels import ChannelSecurity, aio_channel
from splitserve_common.errors import DeadlineExceeded, peer_errors
from splitserve_pb import generation_pb2_grpc
from splitserve_pb import open_inference_pb2 as pb
from splitserve_pb import open_inference_pb2_grpc as pb_grpc

_SERVICE = "inference.GRPCInferenceService"


def service_config(max_attempts: int = 5) -> str:
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": _SERVICE}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
    })


def channel_options(max_message_mb: int = 64) -> list[tuple[str, object]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly when the model service comes back.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]


class ModelClient:
    def __init__(self, address: str, model_name: str = "", max_in_flight: int = 256,
                 default_timeout: float = 30.0, max_message_mb: int = 64, security: ChannelSecurity | None = None):
        self.address = address
        self.model_name = model_name
        self.default_timeout = default_timeout
        self._channel = aio_channel(address, security, options=channel_options(max_message_mb))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self.generation = generation_pb2_grpc.GenerationStub(self._channel)  # the Generation API, same channel
        self._slots = asyncio.Semaphore(max_in_flight)

    async def close(self) -> None:
        await self._channel.close()

    async def metadata(self, timeout: float = 5.0) -> v2_codec.ModelMetadata:
        """The served model's metadata (docs/contracts.md), typed."""
        reply = await self._call(self._stub.ModelMetadata, pb.ModelMetadataRequest(name=self.model_name), timeout)
        return v2_codec.ModelMetadata.from_response(reply)

    async def infer(self, inputs: dict[str, np.ndarray], parameters: dict | None = None,
                    outputs: list[str] | None = None, output_parameters: dict[str, dict] | None = None,
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        """One ModelInfer call: named arrays in, named arrays out (BF16 widened to float32)."""
        request = v2_codec.encode_request(inputs, outputs, parameters, output_parameters, self.model_name)
        return v2_codec.decode_response(await self._call(self._stub.ModelInfer, request, timeout))

    async def _call(self, method, request, timeout: float | None):
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the model service was called")
        async with self._slots:
            with peer_errors(f"model service at {self.address}"):
                return await method(request, timeout=timeout, metadata=call_context.outgoing_metadata())
