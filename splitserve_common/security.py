"""Server side of TLS, mutual TLS and the optional bearer token.

- `--tls-cert` + `--tls-key` turn on TLS; adding `--tls-client-ca` requires every
  client to present a certificate signed by that CA (mutual TLS).
- `--auth-token` requires `authorization: Bearer <token>` on every call except
  grpc.health.v1 (probes cannot send tokens); anything else gets UNAUTHENTICATED.
All of it is off by default.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from splitserve_common.errors import ConfigurationError
from splitserve_common.metrics import wrap_handler
from splitserve_common.settings import Option

SECURITY_OPTIONS = [
    Option("tls-cert", "", "PEM certificate chain of this server; with --tls-key turns TLS on"),
    Option("tls-key", "", "PEM private key of --tls-cert"),
    Option("tls-client-ca", "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)"),
    Option("auth-token", "", "when set, calls must carry 'authorization: Bearer <token>' (health checks excepted)"),
]

# Probes (Docker HEALTHCHECK, Kubernetes gRPC probes) cannot send a token.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path!r}: {exc.strerror}") from exc


def server_credentials(args) -> grpc.ServerCredentials | None:
    """TLS credentials from the SECURITY_OPTIONS values, or None for plaintext."""
    cert, key, client_ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if not cert and not key:
        if client_ca:
            raise ConfigurationError("--tls-client-ca needs --tls-cert and --tls-key (mTLS runs over TLS)")
        return None
    if not (cert and key):
        raise ConfigurationError("TLS needs both --tls-cert and --tls-key")
    pair = [(read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=read_pem(client_ca, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def bearer_value(token: str) -> str:
    return f"Bearer {token}"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the expected bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = bearer_value(token).encode()

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        # Same kind of handler as the real one, so streaming calls are refused cleanly too.
        return wrap_handler(handler, lambda _behavior: _refuse)


async def _refuse(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid bearer token (send 'authorization: Bearer <token>')")


def server_interceptors(args) -> list[grpc.aio.ServerInterceptor]:
    return [BearerTokenInterceptor(args.auth_token)] if args.auth_token else []
