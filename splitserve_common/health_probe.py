"""Ask a server's grpc.health.v1 whether it is SERVING; exit 0 if so, 1 if not.

The container HEALTHCHECK of both images (and the compose healthchecks) run
`python -m splitserve_common.health_probe`; settings come from flags or PROBE_*
variables, TLS and mTLS included, so it works whatever the server's security is.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve_common.channels import ChannelSecurity, sync_channel
from splitserve_common.settings import Option, parse

OPTIONS = [
    Option("address", "127.0.0.1:8001", "host:port of the server to ask"),
    Option("service", "", "service name to ask about (empty: the whole server)"),
    Option("timeout", 3.0, "seconds to wait for the answer", float),
    Option("tls-ca", "", "PEM CA that signed the server's certificate (turns TLS on)"),
    Option("tls-cert", "", "PEM client certificate, when the server requires mTLS"),
    Option("tls-key", "", "private key of --tls-cert"),
    Option("tls-server-name", "", "name expected in the server's certificate"),
]


def check(address: str, security: ChannelSecurity | None = None, service: str = "", timeout: float = 3.0) -> str:
    """The status name (SERVING, NOT_SERVING, ...) or 'UNREACHABLE: <why>'."""
    with sync_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE: {exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv=None) -> int:
    args = parse("splitserve-health-probe", __doc__.splitlines()[0], OPTIONS, "PROBE_", argv)
    security = ChannelSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                               server_name=args.tls_server_name)
    status = check(args.address, security, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
