#!/usr/bin/env python
"""Build both images from the real Dockerfiles and run the stack docker-compose.yml declares.

    python scripts/docker_smoke.py               # engine, base images, build, run, query, stop
    python scripts/docker_smoke.py --no-build    # reuse the images a previous run built

1. Engine: the running Docker engine, or dockerd started here (as root, stopped again at the
   end). When neither works, it prints one `SKIP docker smoke: <why>` line and exits 0.
2. Base images: no registry is reachable on the project's machines, so a missing
   `python:3.11-slim` is made from Debian's packages (debootstrap bookworm with python3
   and pip, `docker import`) and carries this machine's CA bundle, which pip in the build
   needs behind the machine's TLS-inspecting egress.
3. Build, with the classic builder on the host network, each Dockerfile with its own
   `<Dockerfile>.dockerignore` applied to the context; pip gets PIP_CERT and, when this
   machine has a local wheel directory (PIP_FIND_LINKS or pip's find-links), that
   directory served on loopback, from which the CPU torch wheel comes (index: PyPI).
   Tags and build arguments are docker-compose.yml + deploy/compose.cpu.yaml's.
4. Run each service of that stack as a container with `--network host`: the environment,
   read-only bind mounts, read_only root, tmpfs, stop signal and grace period and the health
   check that the file declares, with every address mapped onto loopback and free ports
   (scripts/compose_host.py, as the compose-as-processes test does). The model volume holds
   a tiny classifier built by tests/model_factory.py.
5. Wait until docker reports each healthy (in depends_on order), classify through the client
   SDK from outside and compare with the in-process transformers pipeline, check that the
   preproc image has no torch and runs as non-root, stop the stack with SIGTERM and check
   that each container drained and exited 0 within its grace period.
6. Print the build time and the image sizes.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compose_host", ROOT / "scripts" / "compose_host.py")
compose_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compose_host)
validate_deploy = compose_host.validate_deploy

OVERRIDES = ("deploy/compose.cpu.yaml",)
PYTHON_BASE = "python:3.11-slim"
ROOTFS_CACHE = Path(os.environ.get("SPLITSERVE_ROOTFS_CACHE", "/var/tmp/splitserve-docker/bookworm"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CONTAINER_PREFIX = "splitserve-smoke-"
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: all a bare dockerd offers


class Skip(Exception):
    """The engine cannot run here: not a failure of the project."""


def log(message: str) -> None:
    print(f"[docker-smoke] {message}", flush=True)


def docker(*args, check=True, capture=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=capture, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                           f"{(result.stderr or '')[-4000:]}")
    return result


# ---------------------------------------------------------------- engine

def start_engine() -> subprocess.Popen | None:
    """None when an engine already answers; the dockerd started here otherwise."""
    if shutil.which("docker") is None:
        raise Skip("no docker client on PATH (Debian: apt-get install docker.io)")
    if docker("info", check=False, timeout=30).returncode == 0:
        return None
    if shutil.which("dockerd") is None:
        raise Skip("no Docker engine answers and dockerd is not installed")
    if os.geteuid() != 0:
        raise Skip("no Docker engine answers and only root may start dockerd here")
    daemon_log = tempfile.NamedTemporaryFile(prefix="dockerd-", suffix=".log", delete=False)  # noqa: SIM115
    daemon = subprocess.Popen(["dockerd"], stdout=daemon_log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise Skip(f"dockerd exited with {daemon.returncode} (log: {daemon_log.name})")
        if docker("info", check=False, timeout=30).returncode == 0:
            log(f"started dockerd (pid {daemon.pid}, log {daemon_log.name})")
            return daemon
        time.sleep(1)
    stop_engine(daemon)
    raise Skip(f"dockerd did not answer within 60 s (log: {daemon_log.name})")


def stop_engine(daemon: subprocess.Popen | None) -> None:
    if daemon is not None and daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


# ---------------------------------------------------------------- base images

def have_image(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def make_python_base(tag: str) -> None:
    """A stand-in for python:3.11-slim from Debian bookworm's packages (python3 3.11, pip)."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise Skip(f"base image {tag} is missing and cannot be made here (needs root and debootstrap)")
    if not (ROOTFS_CACHE / "usr" / "bin" / "python3").exists():
        log(f"debootstrap bookworm into {ROOTFS_CACHE} (a few minutes)")
        ROOTFS_CACHE.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-pip,python-is-python3,ca-certificates",
                        "bookworm", str(ROOTFS_CACHE), DEBIAN_MIRROR], check=True, capture_output=True)
    # Like the official image: pip may install into the system Python, no package caches; and this
    # machine's CA bundle, so pip in the build trusts the same issuers as pip here.
    (ROOTFS_CACHE / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    shutil.copyfile(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"),
                    ROOTFS_CACHE / "etc/ssl/certs/ca-certificates.crt")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (ROOTFS_CACHE / cache).glob("*"):
            if item.is_file():
                item.unlink()
    tar = subprocess.Popen(["tar", "-C", str(ROOTFS_CACHE), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    docker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", tag, stdin=tar.stdout)
    tar.wait()
    log(f"imported {tag} from Debian bookworm")


# ---------------------------------------------------------------- build

def context_tar(dockerfile: Path) -> bytes:
    """The build context (repository root) as BuildKit would send it: filtered by the Dockerfile's own
    .dockerignore (last matching pattern wins; a pattern matches a path or any of its parents)."""
    patterns = [line.strip() for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    rules = [(p.startswith("!"), _pattern_regex(p.lstrip("!").strip("/"))) for p in patterns]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        verdict = False
        for negated, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not negated
        return verdict

    with tempfile.TemporaryFile() as buffer:
        # GNU format: the client recognises an archive by its first header (a PAX one would hide it).
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for directory, dirs, files in os.walk(ROOT):
                rel_dir = os.path.relpath(directory, ROOT)
                dirs[:] = [d for d in dirs if d != ".git"]
                for name in files:
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    if not ignored(rel) or rel == str(dockerfile.relative_to(ROOT)):
                        tar.add(os.path.join(directory, name), arcname=rel, recursive=False)
        buffer.seek(0)
        return buffer.read()


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def local_wheel_dir() -> str:
    """This machine's local wheel directory (PIP_FIND_LINKS or pip's find-links), or ""."""
    value = os.environ.get("PIP_FIND_LINKS", "")
    if not value:
        result = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                                capture_output=True, text=True)
        value = result.stdout.strip() if result.returncode == 0 else ""
    return value.split()[0] if value and Path(value.split()[0]).is_dir() else ""


def serve_directory(directory: str) -> http.server.ThreadingHTTPServer:
    """Serve a directory on a free loopback port: the build, on the host network, reads it as find-links."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build(stack: dict, pip_args: dict[str, str]) -> dict[str, float]:
    """Build each service's image as the stack declares it; seconds per image."""
    seconds = {}
    for svc in stack["services"].values():
        dockerfile = ROOT / svc["build"]["dockerfile"]
        args = {**svc["build"].get("args", {}), **pip_args}
        if "model_service" in dockerfile.name and args.get("VARIANT") == "cpu":
            args["CUDA_IMAGE"] = PYTHON_BASE  # the classic builder resolves the unused CUDA stage too
        command = ["build", "--network", "host", "--pull=false", "-f", str(dockerfile.relative_to(ROOT)),
                   "-t", svc["image"], *(f"--build-arg={k}={v}" for k, v in args.items()), "-"]
        log(f"building {svc['image']} from {dockerfile.relative_to(ROOT)}")
        started = time.monotonic()
        result = subprocess.run(["docker", *command], input=context_tar(dockerfile), capture_output=True,
                                timeout=1800, env=BUILD_ENV)
        seconds[svc["image"]] = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"building {svc['image']} failed:\n{result.stdout.decode()[-6000:]}"
                               f"{result.stderr.decode()[-3000:]}")
        log(f"built {svc['image']} in {seconds[svc['image']]:.0f} s")
    return seconds


# ---------------------------------------------------------------- run

class ContainerStack(compose_host.HostStack):
    def container(self, service: str) -> str:
        return CONTAINER_PREFIX + service

    def run(self, service: str, volume_sources: dict[str, Path]) -> None:
        svc = self.services[service]
        argv, timing = self.healthcheck(service)
        flags = ["--name", self.container(service), "--network", "host", "--detach",
                 "--stop-signal", svc.get("stop_signal", "SIGTERM"),
                 "--stop-timeout", str(int(self.stop_grace(service))),
                 "--health-cmd", shlex.join(argv), "--health-interval", f"{timing['interval']}s",
                 "--health-timeout", f"{timing['timeout']}s", "--health-retries", str(timing["retries"]),
                 "--health-start-period", f"{timing['start_period']}s"]
        if svc.get("read_only"):
            flags.append("--read-only")
        for path in svc.get("tmpfs", []):
            flags += ["--tmpfs", path]
        for key, value in self.environment(service).items():
            flags += ["--env", f"{key}={value}"]
        for volume in svc.get("volumes", []):
            mode = "ro" if volume.get("read_only") else "rw"
            flags += ["--volume", f"{volume_sources[volume['target']]}:{volume['target']}:{mode}"]
        docker("run", *flags, svc["image"], *self.map_argv(service, svc.get("command") or []))

    def wait_healthy(self, service: str) -> None:
        _, timing = self.healthcheck(service)
        deadline = time.monotonic() + timing["limit"] + timing["interval"]
        while time.monotonic() < deadline:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", self.container(service)).stdout)
            if not state["Running"]:
                raise RuntimeError(f"{service} exited with {state['ExitCode']}:\n{self.logs(service)[-3000:]}")
            if state.get("Health", {}).get("Status") == "healthy":
                return
            time.sleep(1)
        raise TimeoutError(f"{service} not healthy after {timing['limit']:.0f}s:\n{self.logs(service)[-3000:]}")

    def stop(self, service: str) -> tuple[int, float]:
        """`docker stop` sends the stop signal, then SIGKILL after the grace period: (exit code, seconds)."""
        grace = self.stop_grace(service)
        started = time.monotonic()
        docker("stop", "--time", str(int(grace)), self.container(service), timeout=grace + 60)
        took = time.monotonic() - started
        return int(docker("inspect", "--format", "{{.State.ExitCode}}", self.container(service)).stdout), took

    def logs(self, service: str) -> str:
        result = docker("logs", self.container(service), check=False)
        return result.stdout + result.stderr

    def remove_all(self) -> None:
        for service in self.services:
            docker("rm", "--force", self.container(service), check=False)


def check_preproc_image(image: str) -> None:
    no_torch = docker("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", "import torch",
                      check=False)
    if no_torch.returncode == 0 or "No module named 'torch'" not in no_torch.stderr:
        raise AssertionError(f"{image}: `import torch` should fail, got {no_torch.returncode}: {no_torch.stderr}")
    user = docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    uid = docker("run", "--rm", "--network", "none", "--entrypoint", "id", image, "-u").stdout.strip()
    if user in ("", "0", "root") or uid == "0":
        raise AssertionError(f"{image}: runs as {user or 'root'} (uid {uid}), not a non-root user")
    log(f"{image}: no torch, runs as uid {uid}")


def query(stack: ContainerStack, model_dir: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from transformers import pipeline

    from client.preproc_client import PreprocClient
    from tests.ops_helpers import sample, scrape, sentences

    texts = sentences(8)
    address = f"127.0.0.1:{stack.host_port('preproc', 8011)}"
    with PreprocClient(address) as client:
        results = client.classify(texts)
        info = client.info()
    reference = pipeline("text-classification", model=str(model_dir / "model"),
                         tokenizer=str(model_dir / "components" / "tokenizer"), device="cpu")(texts, truncation=True)
    labels, expected = [r[0].label for r in results], [r["label"] for r in reference]
    worst = max(abs(r[0].score - ref["score"]) for r, ref in zip(results, reference, strict=True))
    if info.task != "text-classification" or labels != expected or worst > 1e-4:
        raise AssertionError(f"answers differ from the pipeline: {labels} vs {expected}, score diff {worst}")
    served = sample(scrape(stack.host_port("preproc", 8012)), "splitserve_requests_total",
                    method="splitserve.v1.Preproc/Classify", code="OK")
    log(f"classified {len(texts)} texts through the containers (same as the pipeline, score diff {worst:.1e}); "
        f"preproc counted {served:g} Classify call(s)")


def make_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.ops_helpers import tiny_model

    model_dir = tiny_model("classifier")
    for directory, _, files in os.walk(model_dir.parent):  # readable by the containers' uid 10001
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    return model_dir


def image_mb(image: str) -> float:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-build", action="store_true", help="reuse the images a previous run built")
    args = parser.parse_args(argv)
    stack_spec = compose_host.merged_stack(*OVERRIDES)
    daemon = None
    wheels = None
    try:
        daemon = start_engine()
        build_seconds = {}
        if not args.no_build:
            if not have_image(PYTHON_BASE):
                make_python_base(PYTHON_BASE)
            pip_args = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
            wheel_dir = local_wheel_dir()
            if wheel_dir:
                wheels = serve_directory(wheel_dir)
                pip_args["PIP_FIND_LINKS"] = f"http://127.0.0.1:{wheels.server_address[1]}/"
                pip_args["TORCH_INDEX_URL"] = "https://pypi.org/simple"
                log(f"pip finds wheels in {wheel_dir} (served at {pip_args['PIP_FIND_LINKS']})")
            build_seconds = build(stack_spec, pip_args)
        model_dir = make_model()
        stack = ContainerStack(stack_spec, {"SPLITSERVE_MODEL_DIR": str(model_dir)})
        stack.remove_all()
        try:
            for service in stack.start_order():
                stack.run(service, {"/models/model": model_dir})
                stack.wait_healthy(service)
                log(f"{service} healthy")
            query(stack, model_dir)
            check_preproc_image(stack.services["preproc"]["image"])
            for service in reversed(stack.start_order()):
                code, took = stack.stop(service)
                drained = "drain" in stack.logs(service)
                if code != 0 or took >= stack.stop_grace(service) or not drained:
                    raise AssertionError(f"{service}: exit {code} after {took:.1f}s, drain logged: {drained}\n"
                                         f"{stack.logs(service)[-3000:]}")
                log(f"{service} stopped by SIGTERM: drained, exit 0 after {took:.1f} s")
        finally:
            stack.remove_all()
        sizes = {svc["image"]: image_mb(svc["image"]) for svc in stack_spec["services"].values()}
        print("docker smoke OK: " + "; ".join(
            f"{image} {sizes[image]:.0f} MB" + (f", built in {build_seconds[image]:.0f} s" if image in build_seconds
                                                 else "") for image in sizes))
        return 0
    except Skip as reason:
        print(f"SKIP docker smoke: {reason}")
        return 0
    finally:
        if wheels is not None:
            wheels.shutdown()
        stop_engine(daemon)


if __name__ == "__main__":
    sys.exit(main())
