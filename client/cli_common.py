"""What both CLIs (`splitserve`, `splitserve-model`) share: connection and output flags, reading
texts, writing results, and the entry point that turns errors into exit statuses.

Results go to stdout, compact: a list of per-input results as JSON lines (one line per input), any
other result as one JSON line (`--format json`: always one line; `--format pretty`: indented).
Diagnostics (errors, a stream's summary) go to stderr as one JSON line. Output cut short by the
reader (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import grpc
import numpy as np

from splitserve_common.channels import ChannelSecurity, sync_channel
from splitserve_common.errors import ConfigurationError

FORMATS = ("jsonl", "json", "pretty")


class UsageError(Exception):
    """The command cannot run as asked (not a service error); the CLI exits with status 2."""


def read_texts(args) -> list[str]:
    if args.texts:
        return list(args.texts)
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def to_json(value):
    if dataclasses.is_dataclass(value):
        return {k: to_json(v) for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, np.ndarray):
        return value.astype(np.float32).tolist()
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def write_result(result, output_format: str = "jsonl", out=None) -> None:
    out = out or sys.stdout
    value = to_json(result)
    if output_format == "pretty":
        out.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    elif output_format == "jsonl" and isinstance(value, list):
        for item in value:
            out.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
    else:
        out.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()


def diagnostic(value: dict) -> None:
    """One JSON line on stderr."""
    print(json.dumps(value, ensure_ascii=False, separators=(",", ":")), file=sys.stderr, flush=True)


def add_common_flags(parser: argparse.ArgumentParser, address_env: str, default: str, service: str) -> None:
    """--address, --timeout, --format and the TLS / mutual TLS / bearer token flags (docs/operations.md)."""
    parser.add_argument("--address", default=os.environ.get(address_env, default),
                        help=f"{service} HOST:PORT (default: %(default)s) [env {address_env}]")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per call in seconds (default: 60)")
    parser.add_argument("--format", dest="output_format", choices=FORMATS, default="jsonl",
                        help="jsonl: one compact JSON line per input (other results: one line); json: the whole "
                             "result as one compact line; pretty: indented (default: jsonl)")
    for flag, env, help_text in (
            ("--tls-ca", "SPLITSERVE_TLS_CA", "PEM CA that signed the server's certificate (turns TLS on)"),
            ("--tls-cert", "SPLITSERVE_TLS_CERT", "PEM client certificate (mutual TLS)"),
            ("--tls-key", "SPLITSERVE_TLS_KEY", "private key of --tls-cert"),
            ("--tls-server-name", "SPLITSERVE_TLS_SERVER_NAME", "name expected in the server's certificate"),
            ("--token", "SPLITSERVE_TOKEN", "bearer token")):
        parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{help_text} [env {env}]")


def channel_from_flags(args, options=()) -> grpc.Channel:
    security = ChannelSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, token=args.token,
                               server_name=args.tls_server_name)
    return sync_channel(args.address, security, options=list(options))


def run_command(client_class, args, options=()) -> int:
    """`args.run(client, args)` on a `client_class` built from the connection flags; the result is
    written to stdout while the channel is open (a streamed result may still be arriving)."""
    with client_class(args.address, timeout=args.timeout, channel=channel_from_flags(args, options)) as client:
        result = args.run(client, args)
        if result is not None:
            write_result(result, args.output_format)
    return 0


def entry(prog: str, parser: argparse.ArgumentParser, client_class, argv=None, options=()) -> int:
    """The CLI entry point: parse, run, and turn every error into a message and an exit status.

    0 done; 1 the service answered with an error (JSON on stderr naming the gRPC status);
    2 the command cannot run as asked or the local setup is wrong (files, TLS flags).
    """
    args = parser.parse_args(argv)
    try:
        return run_command(client_class, args, options)
    except grpc.RpcError as exc:
        diagnostic({"error": {"code": exc.code().name, "message": exc.details()}})
        return 1
    except (UsageError, ConfigurationError, OSError, ValueError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _reader_gone()
        diagnostic({"error": {"code": "USAGE", "message": f"{prog}: {exc}"}})
        return 2
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> int:
    """stdout's reader left (`| head`): stop quietly, and keep Python's exit flush from failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as for any program whose reader left
