"""client/cli.py, client/model_cli.py, client/cli_common.py without servers: every flag has help,
the default addresses show, the subcommands are wired directly, and results print compactly."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from client import cli, cli_common, model_cli


def parsers(parser: argparse.ArgumentParser, path=()):
    """(path, parser) for `parser` and every subcommand's parser, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


@pytest.mark.parametrize("build", [cli.build_parser, model_cli.build_parser], ids=["splitserve", "splitserve-model"])
def test_every_flag_and_argument_has_help(build):
    missing = [f"{' '.join(path) or '(top)'} {action.dest}"
               for path, parser in parsers(build()) for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not (action.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("build, address", [(cli.build_parser, "127.0.0.1:8011"),
                                            (model_cli.build_parser, "127.0.0.1:8001")])
def test_help_shows_the_default_address(build, address, monkeypatch):
    monkeypatch.delenv("SPLITSERVE_ADDRESS", raising=False)
    monkeypatch.delenv("SPLITSERVE_MODEL_ADDRESS", raising=False)
    assert f"(default: {address})" in " ".join(build().format_help().split())


def test_generation_commands_are_wired_directly():
    names = {name for path, _ in parsers(cli.build_parser()) for name in path}
    assert {"predict", "embed", "tokenize", "info", "generate", "chat"} <= names
    assert not hasattr(cli, "PLUGIN_MODULES") and "importlib" not in open(cli.__file__).read()


def write(result, output_format):
    out = io.StringIO()
    cli_common.write_result(result, output_format, out)
    return out.getvalue()


def test_lists_print_one_compact_line_per_item_and_others_one_line():
    embeddings = [np.linspace(-1, 1, 384, dtype=np.float32), np.zeros(384, dtype=np.float32)]
    lines = write(embeddings, "jsonl").splitlines()
    assert len(lines) == 2 and " " not in lines[0]
    assert np.allclose(json.loads(lines[0]), embeddings[0])
    assert write({"task": "fill-mask", "labels": ["a"]}, "jsonl") == '{"task":"fill-mask","labels":["a"]}\n'
    assert write([[1, 2], [3]], "json") == "[[1,2],[3]]\n"
    assert json.loads(write([[1, 2], [3]], "pretty")) == [[1, 2], [3]] and "\n  " in write([[1, 2]], "pretty")
