"""docker-compose.yml, run as plain processes (issue 6, item 4).

There is no Docker engine here, so this test does what compose would: for each
service (in depends_on order) it runs the image's ENTRYPOINT (from the Dockerfile
the service builds) plus the service's command, with exactly the environment the
file declares; host names become 127.0.0.1, each published port a free one, each
volume a directory the test made (a tiny model; certificates). It waits for health
by running the healthcheck the file declares, sends requests through the client
SDK, and stops the stack with SIGTERM within each service's stop_grace_period.
Two stacks: the CPU one (docker-compose.yml + deploy/compose.cpu.yaml) and the same
with deploy/compose.tls.yaml (mutual TLS and the bearer token on both hops).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.preproc_client import PreprocClient
from splitserve_common.channels import ChannelSecurity, sync_channel
from tests.ops_helpers import make_compose_certs, sample, scrape, sentences, tiny_model

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compose_host", ROOT / "scripts" / "compose_host.py")
compose_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compose_host)
validate_deploy = compose_host.validate_deploy

TOKEN = "compose-test-token"


class ComposeAsProcesses(compose_host.HostStack):
    def __init__(self, stack: dict, variables: dict, mounts: dict[str, Path], log_dir: Path):
        super().__init__(stack, variables, mounts)
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def _python(self, argv: list[str]) -> list[str]:
        return [sys.executable if arg == "python" else arg for arg in argv]

    def command(self, service: str) -> list[str]:
        svc = self.services[service]
        entrypoint = svc.get("entrypoint") or validate_deploy.dockerfile_entrypoint(ROOT / svc["build"]["dockerfile"])
        return self._python(self.map_argv(service, [*entrypoint, *(svc.get("command") or [])]))

    def process_environment(self, service: str) -> dict:
        # The image's ENV: offline, unbuffered. PATH and the venv come from this machine.
        return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **self.environment(service)}

    def start(self, service: str) -> None:
        with open(self.log_dir / f"{service}.log", "wb") as log:  # the child keeps its own descriptor
            self.procs[service] = subprocess.Popen(self.command(service), cwd=ROOT,
                                                   env=self.process_environment(service),
                                                   stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, service: str) -> None:
        """Run the declared healthcheck until it passes, within start_period + retries x interval."""
        argv, timing = self.healthcheck(service)
        deadline = time.monotonic() + timing["limit"]
        while time.monotonic() < deadline:
            if self.procs[service].poll() is not None:
                raise RuntimeError(f"{service} exited:\n{self.log(service)}")
            probe = subprocess.run(self._python(argv), cwd=ROOT, env=self.process_environment(service),
                                   capture_output=True, timeout=30)
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{service} not healthy after {timing['limit']:.0f}s:\n{self.log(service)[-3000:]}")

    def stop(self, service: str) -> int | None:
        proc = self.procs[service]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(self.stop_grace(service))
        except subprocess.TimeoutExpired:
            proc.kill()  # what docker does after the grace period
            proc.wait()
            return None

    def log(self, service: str) -> str:
        return (self.log_dir / f"{service}.log").read_text(errors="replace")


_merged = compose_host.merged_stack


@pytest.fixture(scope="module", params=["cpu", "cpu+tls"])
def compose(request, tmp_path_factory):
    """The stack a CPU-only host runs, without and with deploy/compose.tls.yaml."""
    mounts = {"/models/model": tiny_model("classifier")}
    variables = {"SPLITSERVE_MODEL_DIR": "/anywhere"}  # only its presence matters: the mount stands in
    if request.param == "cpu":
        stack, client_security = _merged("deploy/compose.cpu.yaml"), ChannelSecurity()
    else:
        certs = make_compose_certs(tmp_path_factory.mktemp("certs"))
        mounts["/certs"] = certs["ca"].parent
        variables["SPLITSERVE_AUTH_TOKEN"] = TOKEN
        stack = _merged("deploy/compose.cpu.yaml", "deploy/compose.tls.yaml")
        client_security = ChannelSecurity(ca=str(certs["ca"]), cert=str(certs["client_cert"]),
                                          key=str(certs["client_key"]), token=TOKEN)
    runner = ComposeAsProcesses(stack, variables, mounts, tmp_path_factory.mktemp("compose-logs"))
    runner.client_security = client_security
    try:
        for service in runner.start_order():
            runner.start(service)
            runner.wait_healthy(service)
        yield runner
    finally:
        for service in reversed(list(runner.procs)):
            runner.stop(service)


@pytest.mark.parametrize("overrides, api_host", [(["deploy/compose.cpu.yaml"], "127.0.0.1"),
                                                  (["deploy/compose.cpu.yaml", "deploy/compose.tls.yaml"], "")])
def test_only_preproc_faces_the_host(overrides, api_host):
    """model_service (no token, run-time adapter loading) is never published; preproc's gRPC and HTTP
    ports are, on loopback, and on every interface ("") only with the TLS and token overlay.
    Metrics stay on loopback."""
    services = _merged(*overrides)["services"]
    assert validate_deploy.published_ports(services["model-service"]) == []
    assert sorted(validate_deploy.published_ports(services["preproc"]), key=lambda p: p[1]) == [
        (api_host, 8010), (api_host, 8011), ("127.0.0.1", 8012)]


def test_start_order_follows_depends_on(compose):
    assert compose.start_order() == ["model-service", "preproc"]


def test_requests_through_the_client(compose):
    texts = sentences(8)
    address = f"127.0.0.1:{compose.host_port('preproc', 8011)}"
    with PreprocClient(address, channel=sync_channel(address, compose.client_security)) as client:
        results = client.classify(texts)
        info = client.info()
    assert info.task == "text-classification"
    # Same answers as the in-process transformers pipeline on the model the volume holds.
    from transformers import pipeline

    model_dir = tiny_model("classifier")
    reference = pipeline("text-classification", model=str(model_dir / "model"),
                         tokenizer=str(model_dir / "components" / "tokenizer"), device="cpu")(texts, truncation=True)
    assert [item[0].label for item in results] == [ref["label"] for ref in reference]
    assert [item[0].score for item in results] == pytest.approx([ref["score"] for ref in reference], abs=1e-4)
    # The declared metrics ports serve Prometheus text with the calls just made.
    preproc_metrics = scrape(compose.host_port("preproc", 8012))
    model_metrics = scrape(compose.host_port("model-service", 8002))
    assert sample(preproc_metrics, "splitserve_requests_total", method="splitserve.v1.Preproc/Classify",
                  code="OK") >= 1
    assert sample(model_metrics, "splitserve_requests_total", method="inference.GRPCInferenceService/ModelInfer",
                  code="OK") >= 1


def test_security_is_what_the_stack_declares(compose):
    import grpc

    address = f"127.0.0.1:{compose.host_port('preproc', 8011)}"
    security = compose.client_security
    if not security.uses_tls:  # the plain stack: security is off by default
        with PreprocClient(address) as client:
            assert len(client.classify(["the river"])) == 1
        return
    # deploy/compose.tls.yaml: mutual TLS and the token, or nothing.
    for wrong, code in ((ChannelSecurity(), grpc.StatusCode.UNAVAILABLE),  # plaintext: no handshake
                        (ChannelSecurity(ca=security.ca, token=TOKEN), grpc.StatusCode.UNAVAILABLE),  # no client cert
                        (ChannelSecurity(ca=security.ca, cert=security.cert, key=security.key),
                         grpc.StatusCode.UNAUTHENTICATED)):  # no token
        with PreprocClient(address, channel=sync_channel(address, wrong)) as client:
            with pytest.raises(grpc.RpcError) as failure:
                client.classify(["the river"])
        assert failure.value.code() == code


def test_sigterm_stops_the_stack_within_the_grace_period(compose):
    # Last test of the module: stop preproc, then model-service, as `docker compose down` would.
    for service in reversed(compose.start_order()):
        assert compose.stop(service) == 0, f"{service} did not exit cleanly:\n{compose.log(service)[-3000:]}"
        assert "drain" in compose.log(service)
