"""preproc_service/torch_guard.py: a fresh process that hides torch imports transformers without
torch and without transformers' no-torch notice, while its other warnings still show."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT

SCRIPT = """
import sys
from preproc_service.torch_guard import hide_torch
if sys.argv[1] == "hide":
    hide_torch()
import transformers
from transformers.utils import logging
logging.get_logger("transformers").warning("another transformers warning")
print("torch" in sys.modules)
"""


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, check=True)


def test_no_torch_notice_is_dropped_and_other_warnings_kept():
    hidden = run("hide")
    assert hidden.stdout.strip() == "False"
    assert "PyTorch was not found" not in hidden.stderr
    assert "another transformers warning" in hidden.stderr


def test_the_notice_is_what_transformers_says_without_torch():
    """The filter matches transformers' wording: without it the notice shows (the test above can fail)."""
    import textwrap

    script = SCRIPT.replace("hide_torch()", textwrap.dedent("""
        from preproc_service.torch_guard import HideTorch
        sys.meta_path[:] = [HideTorch(list(sys.meta_path))]""").strip().replace("\\n", "\\n    "))
    shown = subprocess.run([sys.executable, "-c", script, "hide"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120, check=True)
    assert "PyTorch was not found" in shown.stderr
