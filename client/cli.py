"""`splitserve` / `python -m client`: call preproc_service from the shell, JSON out.

    splitserve predict "I love this"                   # whatever task the deployment serves
    splitserve predict --labels travel,music "a trip"  # zero-shot
    splitserve predict --context "Alice lives in Paris." "Where does Alice live?"
    echo "one text per line" | splitserve embed
    splitserve tokenize "hello world"; splitserve info

Texts come from the arguments, else one per line from stdin. More subcommands plug in with
`command(name, help)` (a decorator over `configure(parser)` returning `run(client, args)`) in a
module listed in PLUGIN_MODULES.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from client.preproc_client import PreprocClient, _channel_options
from splitserve_common.channels import ChannelSecurity, sync_channel
from splitserve_common.errors import ConfigurationError

# name -> (help, configure(parser) -> run(client, args) -> JSON-able result)
COMMANDS: dict[str, tuple[str, Callable]] = {}


def command(name: str, help_text: str):
    """Register a subcommand: the decorated function adds its arguments and returns its runner."""
    def register(configure):
        COMMANDS[name] = (help_text, configure)
        return configure
    return register


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


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@command("predict", "run the deployment's task on texts (task from the service's Info)")
def _predict(parser):
    parser.add_argument("texts", nargs="*", help="input texts (default: one per line from stdin)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--function-to-apply", choices=["softmax", "sigmoid", "none"])
    parser.add_argument("--text-pair", action="append", help="text-classification: second segment, per text")
    parser.add_argument("--aggregation-strategy", choices=["none", "simple", "first", "average", "max"])
    parser.add_argument("--ignore-labels", help="token-classification: comma-separated labels to drop")
    parser.add_argument("--targets", help="fill-mask: comma-separated candidate tokens")
    parser.add_argument("--context", help="question-answering: the context; the texts are questions")
    parser.add_argument("--doc-stride", type=int)
    parser.add_argument("--max-answer-len", type=int)
    parser.add_argument("--handle-impossible-answer", action="store_true", default=None)
    parser.add_argument("--labels", help="zero-shot-classification: comma-separated candidate labels")
    parser.add_argument("--hypothesis-template")
    parser.add_argument("--multi-label", action="store_true", default=None)
    parser.add_argument("--no-truncation", dest="truncation", action="store_false", default=None)

    def run(client: PreprocClient, args):
        texts = read_texts(args)
        task = client.info().task
        if task == "text-classification":
            return client.classify(texts, args.text_pair, top_k=args.top_k,
                                   function_to_apply=args.function_to_apply, truncation=args.truncation)
        if task == "token-classification":
            return client.classify_tokens(texts, aggregation_strategy=args.aggregation_strategy,
                                          ignore_labels=_csv(args.ignore_labels), truncation=args.truncation)
        if task == "fill-mask":
            return client.fill_mask(texts, top_k=args.top_k, targets=_csv(args.targets), truncation=args.truncation)
        if task == "question-answering":
            return client.answer_question([(q, args.context or "") for q in texts], top_k=args.top_k,
                                          doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                                          handle_impossible_answer=args.handle_impossible_answer)
        if task == "zero-shot-classification":
            return client.zero_shot_classify(texts, _csv(args.labels) or [], multi_label=args.multi_label,
                                             hypothesis_template=args.hypothesis_template)
        if task == "feature-extraction":
            return client.embed(texts, truncation=args.truncation)
        raise SystemExit(f"splitserve predict: the service serves {task!r}; try another subcommand")
    return run


@command("embed", "embedding vectors for texts (feature-extraction models)")
def _embed(parser):
    parser.add_argument("texts", nargs="*")
    parser.add_argument("--pooling", choices=["none", "mean", "cls", "max"])
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--openai", action="store_true", help="answer in the llm/v1/embeddings (OpenAI) shape")

    def run(client: PreprocClient, args):
        texts = read_texts(args)
        if args.openai:
            return client.embeddings(texts)
        return client.embed(texts, pooling=args.pooling, normalize=args.normalize)
    return run


@command("tokenize", "token ids, tokens and character offsets of texts")
def _tokenize(parser):
    parser.add_argument("texts", nargs="*")
    parser.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false", default=None)

    def run(client: PreprocClient, args):
        return client.tokenize(read_texts(args), add_special_tokens=args.add_special_tokens)
    return run


@command("info", "what the deployment serves: task, labels, limits, tokenizer")
def _info(parser):
    return lambda client, args: client.info()


# Modules that add subcommands with @command when present (e.g. generate / chat).
PLUGIN_MODULES = ("client.generation_cli",)


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def add_connection_flags(parser: argparse.ArgumentParser, address_env: str, default: str, service: str) -> None:
    """--address, --timeout and the TLS / mutual TLS / bearer token flags (docs/operations.md)."""
    parser.add_argument("--address", default=os.environ.get(address_env, default),
                        help=f"{service} HOST:PORT [env {address_env}]")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per call in seconds")
    for flag, env, help_text in (
            ("--tls-ca", "SPLITSERVE_TLS_CA", "PEM CA that signed the server's certificate (turns TLS on)"),
            ("--tls-cert", "SPLITSERVE_TLS_CERT", "PEM client certificate (mutual TLS)"),
            ("--tls-key", "SPLITSERVE_TLS_KEY", "private key of --tls-cert"),
            ("--tls-server-name", "SPLITSERVE_TLS_SERVER_NAME", "name expected in the server's certificate"),
            ("--token", "SPLITSERVE_TOKEN", "bearer token")):
        parser.add_argument(flag, default=os.environ.get(env, ""), help=f"{help_text} [env {env}]")


def channel_from_flags(args) -> grpc.Channel:
    security = ChannelSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, token=args.token,
                               server_name=args.tls_server_name)
    return sync_channel(args.address, security, options=_channel_options())


def print_error(exc: grpc.RpcError) -> int:
    """One JSON line on stderr naming the gRPC status; exit status 1."""
    print(json.dumps({"error": {"code": exc.code().name, "message": exc.details()}}), file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="splitserve", description="Call a splitserve preproc_service.")
    add_connection_flags(parser, "SPLITSERVE_ADDRESS", "127.0.0.1:8011", "preproc_service")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, configure) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        sub_parser.set_defaults(run=configure(sub_parser))
    return parser


def run_command(client_class, args) -> int:
    """`args.run(client, args)` on a `client_class` built from the connection flags: the result as
    JSON on stdout (exit 0), or a gRPC error as JSON on stderr (exit 1); a bad TLS setting is one line on
    stderr (exit 2). Shared by both CLIs."""
    try:
        channel = channel_from_flags(args)
    except ConfigurationError as exc:
        print(f"{Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        return 2
    with client_class(args.address, timeout=args.timeout, channel=channel) as client:
        try:
            result = args.run(client, args)
            if hasattr(result, "__iter__") and not isinstance(result, (dict, str)):
                result = list(result)  # while the channel is open: a streamed result may still be arriving
        except grpc.RpcError as exc:
            return print_error(exc)
    print(json.dumps(to_json(result), ensure_ascii=False, indent=2))
    return 0


def main(argv=None) -> int:
    return run_command(PreprocClient, build_parser().parse_args(argv))
