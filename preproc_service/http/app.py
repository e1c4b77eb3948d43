"""preproc_service's HTTP door: the Starlette app behind the shared guard (splitserve_common.http_front).

Routes (every one calls the servicer's gRPC methods, never a second implementation):
- OpenAI-compatible: POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models;
- MLflow's scoring protocol: POST /invocations, GET /ping, /health, /version (mlflow_api.py);
- every unary RPC as JSON: POST /splitserve.v1.Preproc/<Method> (the gRPC path), body and answer
  in protobuf's JSON mapping (field names as in the .proto).
"""

from __future__ import annotations

from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from preproc_service.http.json_io import BadRequest, dumps, read_body
from preproc_service.http.mlflow_api import MlflowRoutes
from preproc_service.http.mlflow_api import error_body as mlflow_error_body
from preproc_service.http.openai_api import OpenAIRoutes
from preproc_service.http.openai_api import error_body as openai_error_body
from splitserve_common.http_front import CallFailed, HttpCallContext, HttpFront, HttpGuard
from splitserve_pb import preproc_pb2

SERVICE = preproc_pb2.DESCRIPTOR.services_by_name["Preproc"]
UNARY_METHODS = {m.name: m for m in SERVICE.methods if not m.client_streaming and not m.server_streaming}
OPEN_PATHS = ("/health", "/ping")  # probes send no token
MLFLOW_PATHS = ("/invocations", "/ping", "/health", "/version")


def error_body(path: str, status: int, message: str, code: str) -> bytes:
    """The guard's refusals (401, 413, 503) in the error shape of the route's protocol."""
    if path.startswith(MLFLOW_PATHS):
        return mlflow_error_body(status, message)
    return openai_error_body(status, message, code)


class RpcRoutes:
    """POST /splitserve.v1.Preproc/<Method>: the unary RPCs with protobuf JSON in and out."""

    def __init__(self, servicer):
        self.servicer = servicer

    def routes(self) -> list[Route]:
        return [Route(f"/{SERVICE.full_name}/{{method}}", self.call, methods=["POST"])]

    async def call(self, http_request: Request) -> Response:
        name = http_request.path_params["method"]
        method = UNARY_METHODS.get(name)
        if method is None:
            return _json_error(404, f"no unary method {SERVICE.full_name}/{name} (streaming methods are gRPC only)")
        try:
            body = await read_body(http_request)
            request = json_format.Parse(body or b"{}", _message_class(method.input_type)())
        except BadRequest as exc:
            return _json_error(exc.status, exc.message)
        except json_format.ParseError as exc:
            return _json_error(400, f"request body is not a valid {method.input_type.name}: {exc}")
        context = HttpCallContext(http_request.scope["state"]["request_id"])
        try:
            answer = await getattr(self.servicer, name)(request, context)
        except CallFailed as exc:
            return _json_error(exc.http_status, exc.message, exc.code.name)
        return Response(json_format.MessageToJson(answer, preserving_proto_field_name=True, indent=None),
                        media_type="application/json")


def _message_class(descriptor):
    return getattr(preproc_pb2, descriptor.name)


def _json_error(status: int, message: str, code: str | None = None) -> Response:
    return Response(dumps({"error": {"message": message, "code": code}}), status, media_type="application/json")


def build_front(args, servicer, health) -> HttpFront:
    """The HTTP door on --http-port, with the gRPC port's token, TLS and message limit."""
    app = Starlette(routes=[*OpenAIRoutes(servicer).routes(), *MlflowRoutes(servicer, health).routes(),
                            *RpcRoutes(servicer).routes()])
    known = {route.path for route in app.routes}

    def route_name(method: str, path: str) -> str:
        if path in known or path.startswith(f"/{SERVICE.full_name}/"):
            return f"{method} {path}"
        return "other"

    guard = HttpGuard(app, token=args.auth_token, max_body=args.max_message_mb * 1024 * 1024,
                      error_body=error_body, route_name=route_name, open_paths=OPEN_PATHS)
    return HttpFront(guard, args, args.http_port)
