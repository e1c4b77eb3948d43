"""model_service's HTTP door: the Open Inference Protocol (v2) over REST, beside the gRPC one.

The KServe v2 / Triton HTTP routes, so `tritonclient.http` works as `tritonclient.grpc` does:
GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/{v}], .../ready;
POST .../infer with JSON tensors (`data`, row-major, nested or flat) and the binary-data
extension (an input's `binary_data_size` parameter, the JSON header's length in the
`Inference-Header-Content-Length` header, the tensors' raw bytes after it; outputs come back
binary when their `binary_data` parameter, or the request's `binary_data_output`, asks).

Each route turns the JSON into the gRPC message and calls the InferenceServicer's method, so
checks, limits, batching and errors are the gRPC API's; tensors go through
splitserve_common.v2_codec. Errors answer `{"error": message}` with the HTTP status of the
gRPC code.
"""

from __future__ import annotations

import json
import re

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from splitserve_common import v2_codec
from splitserve_common.errors import InvalidArgument
from splitserve_common.http_front import CallFailed, HttpCallContext, HttpFront, HttpGuard, body_too_large
from splitserve_pb import open_inference_pb2 as pb

HEADER_LENGTH = "inference-header-content-length"
OPEN_PATHS = ("/v2/health/",)  # probes send no token
_MODEL = "/v2/models/{name}"
_VERSIONED = "/v2/models/{name}/versions/{version}"
_ROUTE_NAMES = [(re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), f"{_MODEL}/infer"),
                (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), f"{_MODEL}/ready"),
                (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), _MODEL),
                (re.compile(r"^/v2(/health/live|/health/ready)?$"), None)]
# Parameters of the binary-data extension: they shape the HTTP body, not the inference.
_BINARY_KEYS = ("binary_data", "binary_data_size", "binary_data_output")


def error_body(_path: str, status: int, message: str, _code: str = "") -> bytes:
    return json.dumps({"error": message}).encode()


def _error(status: int, message: str) -> Response:
    return Response(error_body("", status, message), status, media_type="application/json")


def _json(value, status: int = 200) -> Response:
    return Response(json.dumps(value).encode(), status, media_type="application/json")


def route_name(method: str, path: str) -> str:
    for pattern, name in _ROUTE_NAMES:
        if pattern.match(path):
            return f"{method} {name or path}"
    return "other"


# ---------------------------------------------------------------- REST JSON <-> gRPC messages


def _params(values: dict | None, where: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidArgument(f"{where}: 'parameters' must be an object")
    return {k: v for k, v in values.items() if k not in _BINARY_KEYS}


def infer_request(header: dict, binary: bytes, name: str, version: str) -> tuple[pb.ModelInferRequest, set, bool]:
    """(gRPC request, names of outputs wanted binary, all outputs binary?) of a REST infer body."""
    if not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=str(header.get("id", "")))
    request_params = header.get("parameters") or {}
    v2_codec.set_params(request.parameters, _params(request_params, "request"))
    offset = 0
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidArgument("each input must be an object with a 'name'")
        tensor_name, datatype, shape = tensor["name"], tensor.get("datatype"), tensor.get("shape")
        if not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidArgument(f"input '{tensor_name}': 'datatype' and 'shape' are required")
        entry = request.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
        parameters = tensor.get("parameters") or {}
        v2_codec.set_params(entry.parameters, _params(parameters, f"input '{tensor_name}'"))
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidArgument(f"input '{tensor_name}': binary_data_size {size} runs past the body's "
                                      f"{len(binary)} binary bytes")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(_raw_of_json(tensor_name, datatype, shape, tensor["data"]))
        else:
            raise InvalidArgument(f"input '{tensor_name}' has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise InvalidArgument(f"the body carries {len(binary) - offset} binary bytes no input claims")
    binary_outputs = set()
    for output in header.get("outputs") or []:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument("each requested output must be an object with a 'name'")
        parameters = output.get("parameters") or {}
        entry = request.outputs.add(name=output["name"])
        v2_codec.set_params(entry.parameters, _params(parameters, f"output '{output['name']}'"))
        if parameters.get("binary_data"):
            binary_outputs.add(output["name"])
    return request, binary_outputs, bool(request_params.get("binary_data_output"))


def _raw_of_json(name: str, datatype: str, shape: list, data) -> bytes:
    if datatype == "BF16":
        raise InvalidArgument(f"input '{name}': BF16 travels as binary data only (binary_data_size)")
    dtype = v2_codec.numpy_dtype(datatype, name)
    try:
        if datatype == "BYTES":
            flat = np.array([item.encode() if isinstance(item, str) else bytes(item)
                             for item in np.asarray(data, dtype=object).ravel()], dtype=object)
        else:
            flat = np.asarray(data, dtype=dtype).ravel()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"input '{name}': data does not fit {datatype}: {exc}") from None
    expected = int(np.prod(shape)) if shape else 1
    if flat.size != expected:
        raise InvalidArgument(f"input '{name}': {flat.size} values for shape {shape} ({expected} expected)")
    return v2_codec.to_raw(flat.reshape(shape))[2]


def infer_response(response: pb.ModelInferResponse, binary_outputs: set, all_binary: bool) -> tuple[bytes, int]:
    """(body, JSON header length) of a REST infer answer."""
    outputs, binary = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = v2_codec.params_to_dict(tensor.parameters)
        if all_binary or tensor.name in binary_outputs:
            parameters["binary_data_size"] = len(raw)
            binary.append(raw)
        else:
            array = v2_codec.decode_tensor(tensor.name, tensor.datatype, list(tensor.shape), raw)
            if tensor.datatype == "BF16":
                array = v2_codec.bf16_to_float32(array)
            if tensor.datatype == "BYTES":
                entry["data"] = [item.decode("utf-8", "replace") for item in array.ravel()]
            else:
                entry["data"] = array.ravel().tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    header = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    parameters = v2_codec.params_to_dict(response.parameters)
    if parameters:
        header["parameters"] = parameters
    body = json.dumps(header).encode()
    return body + b"".join(binary), len(body) if binary else 0


def _tensor_specs(specs) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]


# ---------------------------------------------------------------- the routes


class V2Routes:
    def __init__(self, servicer):
        self.servicer = servicer

    def routes(self) -> list[Route]:
        return [Route("/v2", self.server_metadata, methods=["GET"]),
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.ready, methods=["GET"]),
                *(route for base in (_MODEL, _VERSIONED) for route in (
                    Route(base, self.model_metadata, methods=["GET"]),
                    Route(f"{base}/ready", self.model_ready, methods=["GET"]),
                    Route(f"{base}/infer", self.infer, methods=["POST"])))]

    @staticmethod
    def _context(request: Request) -> HttpCallContext:
        return HttpCallContext(request.scope["state"]["request_id"])

    async def server_metadata(self, request: Request) -> Response:
        answer = await self.servicer.ServerMetadata(pb.ServerMetadataRequest(), self._context(request))
        return _json({"name": answer.name, "version": answer.version,
                      "extensions": [*answer.extensions, "binary_tensor_data"]})

    async def live(self, request: Request) -> Response:
        answer = await self.servicer.ServerLive(pb.ServerLiveRequest(), self._context(request))
        return Response(status_code=200 if answer.live else 503)

    async def ready(self, request: Request) -> Response:
        answer = await self.servicer.ServerReady(pb.ServerReadyRequest(), self._context(request))
        return Response(status_code=200 if answer.ready else 503)

    async def _per_model(self, request: Request, rpc, message_type):
        """Call a per-model RPC with the name and version from the path: (answer, None) or (None, error response)."""
        path = request.path_params
        try:
            message = message_type(name=path["name"], version=path.get("version", ""))
            return await rpc(message, self._context(request)), None
        except CallFailed as exc:
            return None, _error(exc.http_status, exc.message)

    async def model_ready(self, request: Request) -> Response:
        answer, error = await self._per_model(request, self.servicer.ModelReady, pb.ModelReadyRequest)
        if error is not None:
            return error
        return Response(status_code=200 if answer.ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        answer, error = await self._per_model(request, self.servicer.ModelMetadata, pb.ModelMetadataRequest)
        if error is not None:
            return error
        return _json({"name": answer.name, "versions": list(answer.versions), "platform": answer.platform,
                      "inputs": _tensor_specs(answer.inputs), "outputs": _tensor_specs(answer.outputs),
                      "parameters": v2_codec.params_to_dict(answer.parameters)})

    async def infer(self, request: Request) -> Response:
        path = request.path_params
        try:
            body = await _read_body(request)
            header_length = request.headers.get(HEADER_LENGTH)
            if header_length is not None:
                if not header_length.isdigit() or int(header_length) > len(body):
                    raise InvalidArgument(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
                split = int(header_length)
            else:
                split = len(body)
            try:
                header = json.loads(body[:split])
            except ValueError as exc:
                raise InvalidArgument(f"the inference header is not valid JSON: {exc}") from None
            if not isinstance(header, dict):
                raise InvalidArgument("the inference header must be a JSON object")
            grpc_request, binary_outputs, all_binary = infer_request(header, body[split:], path["name"],
                                                                     path.get("version", ""))
            answer = await self.servicer.ModelInfer(grpc_request, self._context(request))
        except InvalidArgument as exc:
            return _error(400, exc.message)
        except _TooLarge as exc:
            return _error(413, str(exc))
        except CallFailed as exc:
            return _error(exc.http_status, exc.message)
        content, json_length = infer_response(answer, binary_outputs, all_binary)
        if not json_length:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


class _TooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    limit = request.scope["state"]["max_body"]
    if request.headers.get("content-encoding", "identity") != "identity":
        raise InvalidArgument(f"content-encoding {request.headers['content-encoding']!r} is not supported")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(body_too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def build_front(args, servicer) -> HttpFront:
    """The v2 REST door on --http-port, with the gRPC port's token, TLS and message limit."""
    app = Starlette(routes=V2Routes(servicer).routes())
    guard = HttpGuard(app, token=args.auth_token, max_body=args.max_message_mb * 1024 * 1024,
                      error_body=error_body, route_name=route_name, open_paths=OPEN_PATHS)
    return HttpFront(guard, args, args.http_port)
