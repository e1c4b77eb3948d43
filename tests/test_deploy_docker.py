"""scripts/docker_smoke.py's parts that run without an engine (issue 14, item 6): the build context
honours each Dockerfile's own .dockerignore, and without Docker the script skips, saying why.
The build-and-run itself needs a Docker engine: `make docker-smoke` / `SPLITSERVE_DOCKER_SMOKE=1 .ci/run`."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("docker_smoke", ROOT / "scripts" / "docker_smoke.py")
docker_smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docker_smoke)


def _names(dockerfile: str) -> list[str]:
    data = docker_smoke.context_tar(ROOT / dockerfile)
    return tarfile.open(fileobj=io.BytesIO(data)).getnames()


def test_build_context_follows_the_dockerfile_dockerignore(tmp_path):
    names = _names("deploy/preproc_service.Dockerfile")
    assert "deploy/preproc_service.Dockerfile" in names and "pyproject.toml" in names
    assert "preproc_service/__main__.py" in names and "splitserve_pb/preproc_pb2.py" in names
    top = {name.split("/")[0] for name in names}
    assert top == {"README.md", "pyproject.toml", "deploy", "splitserve_pb", "splitserve_common", "model_service",
                   "preproc_service", "client"}
    assert [n for n in names if n.startswith("deploy/")] == ["deploy/preproc_service.Dockerfile"]
    assert not [n for n in names if "__pycache__" in n]


def test_dockerignore_patterns():
    regex = docker_smoke._pattern_regex
    assert regex("**/__pycache__").fullmatch("__pycache__")
    assert regex("**/__pycache__").fullmatch("client/sub/__pycache__")
    assert regex("*").fullmatch("tests") and not regex("*").fullmatch("tests/x.py")
    assert not regex("client/").fullmatch("clients")


def test_skips_with_a_clear_line_without_docker(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no docker client on PATH
    result = subprocess.run([sys.executable, "scripts/docker_smoke.py", "--no-build"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("SKIP docker smoke: no docker client on PATH")
