"""`splitserve-model` / `python -m client.model_cli`: call model_service from the shell, JSON out.

    splitserve-model health                                # grpc.health.v1 status, live, ready
    splitserve-model metadata                              # inputs, outputs, task, labels, adapters, ...
    splitserve-model infer --input input_ids='[[101, 7592, 102]]' --output sentence_embedding
    splitserve-model infer --input input_ids=@ids.npy --output logits --param top_k=3
    splitserve-model adapters list | load NAME PATH | unload NAME

An input is NAME=JSON (nested lists; integers travel as INT64, floats as FP32), NAME:DATATYPE=JSON
to choose the v2 datatype (e.g. attention_mask:INT32=...), or NAME=@FILE.npy. A parameter is
KEY=VALUE with VALUE read as JSON when it parses (3, true, "mean"), else as a string.
Output and errors as for `splitserve` (client/cli_common.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.adapters_client import AdaptersClient
from client.cli_common import UsageError, add_common_flags, entry
from client.preproc_client import _channel_options
from client.tensor_client import TensorClient
from splitserve_common import v2_codec
from splitserve_pb import open_inference_pb2 as pb


def parse_input(text: str) -> tuple[str, np.ndarray]:
    """NAME[:DATATYPE]=JSON or NAME[:DATATYPE]=@FILE.npy -> (name, array)."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected NAME=JSON or NAME=@FILE.npy")
    name, _, datatype = name.partition(":")
    try:
        array = np.load(value[1:]) if value.startswith("@") else np.asarray(json.loads(value))
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--input {name}: {exc}") from exc
    if datatype:
        datatype = datatype.upper()
        castable = [d for d in v2_codec.NUMPY_DTYPES if d not in ("BF16", "BYTES")]  # JSON strings go as BYTES
        if datatype not in castable:
            choices = ", ".join(castable)
            raise argparse.ArgumentTypeError(f"--input {name}: datatype {datatype!r} is not one of {choices}")
        array = array.astype(v2_codec.NUMPY_DTYPES[datatype])
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    return name, array


def parse_param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _health(client: TensorClient, args) -> dict:
    status = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                               timeout=args.timeout)
    return {"status": health_pb2.HealthCheckResponse.ServingStatus.Name(status.status),
            "live": client.stub.ServerLive(pb.ServerLiveRequest(), timeout=args.timeout).live,
            "ready": client.stub.ServerReady(pb.ServerReadyRequest(), timeout=args.timeout).ready}


def _metadata(client: TensorClient, args) -> dict:
    return dataclasses.asdict(client.metadata(args.model))


def _infer(client: TensorClient, args) -> dict:
    result = client.infer(dict(args.input), outputs=args.output, parameters=dict(args.param or []),
                          model_name=args.model)
    outputs = {name: {"datatype": v2_codec.v2_datatype(array), "shape": list(array.shape), "data": array.tolist()}
               for name, array in result.items()}
    return {"outputs": outputs, "parameters": result.parameters}


def _adapters(client: TensorClient, args):
    adapters = AdaptersClient(channel=client.channel, timeout=args.timeout, token=args.adapter_token,
                              header="x-adapter-token" if args.token else "authorization")
    if args.action == "list":
        return adapters.list()
    if not args.name:
        raise UsageError(f"adapters {args.action} needs NAME")
    if args.action == "load":
        if not args.path:
            raise UsageError("adapters load NAME PATH: PATH is missing")
        return adapters.load(args.name, args.path)
    return adapters.unload(args.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve-model", description="Call a splitserve model_service.")
    add_common_flags(parser, "SPLITSERVE_MODEL_ADDRESS", "127.0.0.1:8001", "model_service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    health = sub.add_parser("health", help="grpc.health.v1 status and the v2 live/ready answers")
    health.add_argument("--service", default="", help="health service name ('' = the whole server)")
    health.set_defaults(run=_health)

    metadata = sub.add_parser("metadata", help="model metadata: inputs, outputs and parameters")
    metadata.add_argument("--model", default="", help="model name ('' = the one served)")
    metadata.set_defaults(run=_metadata)

    infer = sub.add_parser("infer", help="one ModelInfer call")
    infer.add_argument("--input", action="append", type=parse_input, required=True,
                       help="NAME[:DATATYPE]=JSON or NAME=@FILE.npy (repeatable)")
    infer.add_argument("--output", action="append", help="output to return (repeatable; default: the model's)")
    infer.add_argument("--param", action="append", type=parse_param, help="request parameter KEY=VALUE")
    infer.add_argument("--model", default="", help="model name ('' = the one served)")
    infer.set_defaults(run=_infer)

    adapters = sub.add_parser("adapters", help="list, load or unload PEFT adapters")
    adapters.add_argument("action", choices=["list", "load", "unload"], help="what to do")
    adapters.add_argument("name", nargs="?", default="", help="adapter name (load, unload)")
    adapters.add_argument("path", nargs="?", default="", help="adapter directory on the model_service host (load)")
    adapters.add_argument("--adapter-token", default=os.environ.get("SPLITSERVE_ADAPTER_TOKEN", ""),
                          help="token of --adapter-management token on the server, when it is not --token "
                               "[env SPLITSERVE_ADAPTER_TOKEN]")
    adapters.set_defaults(run=_adapters)
    return parser


def main(argv=None) -> int:
    return entry("splitserve-model", build_parser(), TensorClient, argv, _channel_options())


if __name__ == "__main__":
    sys.exit(main())
