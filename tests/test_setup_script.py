"""scripts/setup.sh shows its progress on stderr and keeps pip's exit status, run on a copy of the
repository whose .venv/bin/python is a script that answers like pip (no network here)."""

from __future__ import annotations

import shutil
import subprocess

from tests.servers import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
# Answers `python -m pip install ...` like pip: a few lines, then the status in $PIP_STATUS.
case " $* " in *" --upgrade pip "*) exit 0 ;; esac
echo "Collecting torch==2.13.0"
echo "  Using cached torch-2.13.0-cp311-none-linux_x86_64.whl"
echo "Installing collected packages: torch, splitserve"
[ "${PIP_STATUS:-0}" = 0 ] && echo "Successfully installed splitserve-0.1.0 torch-2.13.0"
exit "${PIP_STATUS:-0}"
"""


def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(root, status=0):
    return subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PIP_STATUS": str(status)})


def test_each_step_and_what_pip_installs_show_on_stderr(tmp_path):
    root = checkout(tmp_path)
    done = setup(root)
    assert done.returncode == 0 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == "setup: upgrading pip" and lines[1].startswith("setup: installing torch 2.13.0")
    assert "Collecting torch==2.13.0" in lines and "Successfully installed splitserve-0.1.0 torch-2.13.0" in lines
    assert not any("Using cached" in line for line in lines)  # pip's detail stays out
    assert lines[-1].startswith("setup: done in ")
    again = setup(root)
    assert again.returncode == 0 and again.stderr == "setup: .venv is up to date with pyproject.toml\n"


def test_a_failed_install_fails_the_setup(tmp_path):
    root = checkout(tmp_path)
    failed = setup(root, status=3)
    assert failed.returncode == 3 and "setup: done" not in failed.stderr
    assert not (root / ".venv" / ".splitserve-installed").exists()
