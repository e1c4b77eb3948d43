"""splitserve_common/settings.py: flag > environment variable > default, for every kind of option,
the help text, bad environment values, and the README table."""

from __future__ import annotations

import pytest

from splitserve_common.settings import Option, build_parser, parse, settings_table

PREFIX = "TESTSVC_"
OPTIONS = [
    Option("model-dir", "", "where the model is"),
    Option("port", 8001, "gRPC port", type=int),
    Option("drain-seconds", 2.5, "drain time", type=float),
    Option("merge-peft", False, "fold the adapter", type=bool),
    Option("device", "auto", "device", choices=["auto", "cpu", "cuda"]),
    Option("adapter", [], "NAME=DIR", repeated=True),
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for opt in OPTIONS:
        monkeypatch.delenv(opt.env_var(PREFIX), raising=False)
    return monkeypatch


def run(argv=()):
    return parse("svc", "a service", OPTIONS, PREFIX, list(argv))


def test_defaults_when_nothing_is_set():
    args = run()
    assert (args.model_dir, args.port, args.drain_seconds, args.merge_peft, args.device, args.adapter) == \
        ("", 8001, 2.5, False, "auto", [])
    assert not any(name.startswith("_env_") for name in vars(args))


def test_environment_overrides_defaults_and_flags_override_the_environment(clean_env):
    clean_env.setenv("TESTSVC_PORT", "9000")
    clean_env.setenv("TESTSVC_DRAIN_SECONDS", "7")
    clean_env.setenv("TESTSVC_MERGE_PEFT", "yes")
    clean_env.setenv("TESTSVC_DEVICE", "cpu")
    clean_env.setenv("TESTSVC_ADAPTER", "a=/x, b=/y,")
    args = run()
    assert (args.port, args.drain_seconds, args.merge_peft, args.device, args.adapter) == \
        (9000, 7.0, True, "cpu", ["a=/x", "b=/y"])
    args = run(["--port", "9100", "--no-merge-peft", "--device", "cuda", "--adapter", "c=/z"])
    assert (args.port, args.merge_peft, args.device, args.adapter) == (9100, False, "cuda", ["c=/z"])


@pytest.mark.parametrize("raw, value", [("1", True), ("TRUE", True), ("on", True), ("0", False), ("off", False),
                                        ("", False), (" no ", False)])
def test_boolean_environment_values(clean_env, raw, value):
    clean_env.setenv("TESTSVC_MERGE_PEFT", raw)
    assert run().merge_peft is value


def test_repeated_flag_collects_every_value():
    assert run(["--adapter", "a=/x", "--adapter", "b=/y"]).adapter == ["a=/x", "b=/y"]


@pytest.mark.parametrize("env, value, words", [
    ("TESTSVC_PORT", "eighty", "TESTSVC_PORT='eighty'"),
    ("TESTSVC_MERGE_PEFT", "maybe", "not a boolean"),
    ("TESTSVC_DRAIN_SECONDS", "soon", "TESTSVC_DRAIN_SECONDS"),
])
def test_bad_environment_values_exit_naming_the_variable(clean_env, capsys, env, value, words):
    clean_env.setenv(env, value)
    with pytest.raises(SystemExit) as excinfo:
        run()
    assert excinfo.value.code == 2 and words in capsys.readouterr().err


def test_choices_are_enforced_on_flags(capsys):
    with pytest.raises(SystemExit):
        run(["--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_help_names_each_variable_and_default():
    text = build_parser("svc", "a service", OPTIONS, PREFIX).format_help()
    for opt in OPTIONS:
        assert f"--{opt.name}" in text and opt.env_var(PREFIX) in text
    assert "[env TESTSVC_PORT; default: 8001]" in " ".join(text.split())


def test_settings_table_has_one_row_per_option():
    rows = settings_table(OPTIONS, PREFIX).splitlines()
    assert rows[0] == "| flag | variable | default | meaning |" and len(rows) == 2 + len(OPTIONS)
    assert "| `--model-dir` | `TESTSVC_MODEL_DIR` | (none) | where the model is |" in rows
    assert "| `--port` | `TESTSVC_PORT` | `8001` | gRPC port |" in rows
    assert "| `--adapter` | `TESTSVC_ADAPTER` | (none) | NAME=DIR |" in rows
