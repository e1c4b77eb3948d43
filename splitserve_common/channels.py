"""Client channels with TLS / mutual TLS and the bearer token, for every hop.

preproc's model client and the client SDK build their channels here, so the
client side of `security.py` is the same everywhere:

    security = ChannelSecurity(ca="ca.pem", cert="client.pem", key="client.key", token="s3cret")
    channel = aio_channel("model:8001", security, options)   # grpc.aio
    channel = sync_channel("preproc:8011", security)          # blocking grpc

A service that dials another takes `client_options("model-service")`:
`--model-service-tls-ca`, `--model-service-tls-cert`, `--model-service-tls-key`,
`--model-service-tls-server-name`, `--model-service-token`.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from splitserve_common.security import bearer_value, read_pem
from splitserve_common.settings import Option


@dataclass(frozen=True)
class ChannelSecurity:
    ca: str = ""            # PEM CA that signed the server's certificate; turns TLS on
    cert: str = ""          # PEM client certificate, for mutual TLS
    key: str = ""           # its private key
    token: str = ""         # bearer token sent as 'authorization: Bearer <token>'
    server_name: str = ""   # expected name in the server certificate, when it differs from the target host
    tls: bool = False       # TLS with the system's CA bundle, when no `ca` is given

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs both cert and key")
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca, "TLS CA") if self.ca else None,
            private_key=read_pem(self.key, "TLS client key") if self.key else None,
            certificate_chain=read_pem(self.cert, "TLS client certificate") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name and self.uses_tls else []

    @classmethod
    def from_args(cls, args, peer: str) -> ChannelSecurity:
        """From the values of `client_options(peer)`."""
        values = vars(args)
        dest = peer.replace("-", "_")
        return cls(ca=values[f"{dest}_tls_ca"], cert=values[f"{dest}_tls_cert"], key=values[f"{dest}_tls_key"],
                   token=values[f"{dest}_token"], server_name=values[f"{dest}_tls_server_name"])


def client_options(peer: str) -> list[Option]:
    """Flags (and env vars) for dialing `peer` securely, e.g. peer='model-service'."""
    return [
        Option(f"{peer}-tls-ca", "", f"PEM CA that signed {peer}'s certificate; turns TLS on for that hop"),
        Option(f"{peer}-tls-cert", "", f"PEM client certificate presented to {peer} (mutual TLS)"),
        Option(f"{peer}-tls-key", "", f"private key of --{peer}-tls-cert"),
        Option(f"{peer}-tls-server-name", "", f"name expected in {peer}'s certificate, when not the target host"),
        Option(f"{peer}-token", "", f"bearer token sent to {peer}"),
    ]


def aio_channel(target: str, security: ChannelSecurity | None = None, options=()) -> grpc.aio.Channel:
    security = security or ChannelSecurity()
    all_options = [*options, *security.channel_options()]
    interceptors = _aio_token_interceptors(security.token) if security.token else None
    credentials = security.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=all_options, interceptors=interceptors)


def sync_channel(target: str, security: ChannelSecurity | None = None, options=()) -> grpc.Channel:
    security = security or ChannelSecurity()
    all_options = [*options, *security.channel_options()]
    credentials = security.credentials()
    if credentials is None:
        channel = grpc.insecure_channel(target, options=all_options)
    else:
        channel = grpc.secure_channel(target, credentials, options=all_options)
    if security.token:
        channel = grpc.intercept_channel(channel, _SyncTokenInterceptor(security.token))
    return channel


# The token travels as call metadata through interceptors rather than call
# credentials, because grpc refuses call credentials on plaintext channels and
# the token is also useful without TLS (e.g. inside a trusted network).

def _with_token(details, token: str):
    metadata = [*(details.metadata or ()), ("authorization", bearer_value(token))]
    return details._replace(metadata=metadata)


class _AioToken:
    def __init__(self, token: str):
        self.token = token


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self.token), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self.token), request_iterator)


def _aio_token_interceptors(token: str):
    return [cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class _SyncTokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), ("authorization", bearer_value(self.token))],
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    """grpc.ClientCallDetails for the blocking API (it has no public constructor)."""

    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
