"""The README stays true: its settings tables are the code's, and CI runs its test command."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import readme_settings  # noqa: E402


def test_settings_tables_match_the_code():
    readme = (ROOT / "README.md").read_text()
    assert readme_settings.render(readme) == readme, "run python scripts/readme_settings.py"
    for name in ("--model-dir", "--max-batch-size", "--model-service", "--max-in-flight"):
        assert f"| `{name}` |" in readme


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
