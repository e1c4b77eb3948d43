"""Start the real services as subprocesses on loopback for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
HTTP_SERVICES = ("preproc_service", "no_torch_preproc", "model_service")  # services with an HTTP door (--http-port)


# Seconds a service may take to start serving: importing torch and transformers and loading a model took
# over 120 s on the 2-core machine under a load average of 30 (the wait ends as soon as it serves).
START_SECONDS = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60.0, what="condition"):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def health_status(address: str, service: str = "", timeout: float = 1.0):
    """The grpc.health.v1 status of `service` at `address`, or None when unreachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return reply.status


class ServiceProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, http_port: int = 0):
        self.proc = proc
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.http_port = http_port
        self.http_url = f"http://127.0.0.1:{http_port}" if http_port else ""
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_serving(self, timeout: float | None = None) -> None:
        timeout = START_SECONDS if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            if health_status(self.address) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"service at {self.address} not SERVING after {timeout}s:\n{self.log()}")

    def stop(self, sig_timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# A port free_port() found may be taken (by another process's outgoing connection, say) before the service
# binds it: the service then exits naming the busy port, and is started again on fresh ports.
PORT_ATTEMPTS = 3


def _port_was_taken(log: str) -> bool:
    return "the port is in use" in log or "address already in use" in log


@contextmanager
def service(module: str, args: list[str], *, port: int | None = None, env: dict | None = None,
            log_dir: Path | None = None, wait: bool = True, timeout: float | None = None):
    """Run `python -m module --port PORT args...` until the block exits (SIGTERM, then kill).

    The HTTP door, which is on by default, gets a free port too unless `args` choose one
    (`http_url` / `http_port` of the handle), so services started side by side never collide.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        handle = _start(module, args, port, env, log_dir)
        try:
            if wait:
                handle.wait_serving(timeout)
            break
        except RuntimeError:
            handle.stop()
            # A port the caller chose would be busy again: only ports free_port() picked are worth a retry.
            if attempt == PORT_ATTEMPTS or port or not _port_was_taken(handle.log()):
                raise
    try:
        yield handle
    finally:
        handle.stop()


def _start(module: str, args: list[str], port: int | None, env: dict | None, log_dir: Path | None) -> ServiceProcess:
    port = port or free_port()
    http_port = 0
    if module in HTTP_SERVICES and "--http-port" not in args:
        http_port = free_port()
        args = [*args, "--http-port", str(http_port)]
    elif "--http-port" in args:
        http_port = int(args[args.index("--http-port") + 1])
    log_dir = Path(log_dir or os.environ.get("SPLITSERVE_TEST_LOGS", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{module}-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
                                cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    return ServiceProcess(proc, port, log_path, http_port)


# torch threads of the model services the tests start, and of the test process (conftest.py), so
# in-process references split their reductions as the services do. One: on a small shared machine
# intra-op threads of several processes spinning on each other slow tiny models by an order of magnitude.
TORCH_THREADS = 1


def model_service(model_dir, *extra: str, **kwargs):
    """`extra` may name --torch-threads itself (the last value wins)."""
    return service("model_service", ["--model-dir", str(model_dir), "--torch-threads", str(TORCH_THREADS), *extra],
                   **kwargs)


def preproc_service(model_dir, model_address: str, *extra: str, **kwargs):
    return service("preproc_service", ["--model-dir", str(model_dir), "--model-service", model_address, *extra],
                   **kwargs)
