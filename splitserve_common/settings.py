"""Every setting is a command-line flag and an environment variable (12-factor).

Precedence: flag > environment variable > default. `--help` lists each option
with its variable and default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Option:
    name: str  # flag name without dashes, e.g. "model-dir"
    default: Any
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[Any] | None = None
    repeated: bool = False  # may be given several times; env var is comma-separated

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def env_var(self, prefix: str) -> str:
        return prefix + self.dest.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def seconds(text: str) -> float:
    """The type of every `*-seconds` option: a finite number >= 0 (NaN, inf and negatives are refused
    by the parser, naming the flag or variable, before the service starts)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(f"not a finite number of seconds >= 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    """A count of at least 1 (0 and negatives are refused by the parser, naming the flag or variable)."""
    value = int(text)
    if value < 1:
        raise ValueError(f"not a whole number >= 1: {text!r}")
    return value


def build_parser(prog: str, description: str, options: Sequence[Option], env_prefix: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for opt in options:
        env = opt.env_var(env_prefix)
        raw = os.environ.get(env)
        default = opt.default
        if raw is not None:
            try:
                if opt.repeated:
                    default = [opt.type(v.strip()) for v in raw.split(",") if v.strip()]
                elif opt.type is bool:
                    default = _parse_bool(raw)
                else:
                    default = opt.type(raw)
            except ValueError as exc:
                parser.error(f"environment variable {env}={raw!r}: {exc}")
        shown = ",".join(map(str, opt.default)) if opt.repeated else opt.default
        help_text = f"{opt.help} [env {env}; default: {shown!r}]"
        if opt.type is bool:
            parser.add_argument(f"--{opt.name}", dest=opt.dest, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif opt.repeated:
            parser.add_argument(f"--{opt.name}", dest=opt.dest, default=None, help=help_text, type=opt.type,
                                action="append", choices=opt.choices)
            parser.set_defaults(**{f"_env_{opt.dest}": default})
        else:
            parser.add_argument(f"--{opt.name}", dest=opt.dest, default=default, help=help_text, type=opt.type,
                                choices=opt.choices)
    return parser


def parse(prog: str, description: str, options: Sequence[Option], env_prefix: str,
          argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser(prog, description, options, env_prefix)
    args = parser.parse_args(argv)
    for opt in options:
        if opt.repeated:
            env_default = getattr(args, f"_env_{opt.dest}")
            delattr(args, f"_env_{opt.dest}")
            if getattr(args, opt.dest) is None:
                setattr(args, opt.dest, list(env_default))
    return args


def settings_table(options: Sequence[Option], env_prefix: str) -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for opt in options:
        default = ",".join(map(str, opt.default)) if opt.repeated else opt.default
        shown = f"`{default}`" if default != "" else "(none)"
        rows.append(f"| `--{opt.name}` | `{opt.env_var(env_prefix)}` | {shown} | {opt.help} |")
    return "\n".join(rows)
