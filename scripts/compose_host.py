"""docker-compose.yml's services as they run on one host, every address on loopback.

Compose v2 is not installable on the project's machines, so two runners read the file
themselves: tests/test_deploy_compose.py (each service as a process) and
scripts/docker_smoke.py (each service as a container on the host network). Both need the
same translation, kept here:

- every port a service listens on (published `ports` and `expose`d ones) gets a free
  port on this host, since all services share its network;
- in the declared environment, command and health check: `${VAR}` interpolation,
  `0.0.0.0` -> `127.0.0.1`, another service's `name:PORT` -> `127.0.0.1:<its port>`,
  the service's own port -> its free port, and (for processes only) each volume
  target -> the host directory standing in for it;
- the start order from `depends_on`, the health-check timing and the stop grace period.
"""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("validate_deploy", ROOT / "scripts" / "validate_deploy.py")
validate_deploy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate_deploy)


def interpolate(text: str, variables: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $VAR."""
    def replace(match):
        name, op, arg = match.group(1) or match.group(4), match.group(2), match.group(3)
        value = variables.get(name)
        if op == ":-" and not value:
            return arg
        if op == ":?" and not value:
            raise ValueError(f"compose needs {name}: {arg}")
        return value or ""
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}|\$(\w+)", replace, str(text))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merged_stack(*overrides: str) -> dict:
    """docker-compose.yml merged with the given override files (paths relative to the repository)."""
    stack = validate_deploy.load_compose(validate_deploy.COMPOSE_FILE)
    for override in overrides:
        stack = validate_deploy.merge_compose(stack, validate_deploy.load_compose(ROOT / override))
    return stack


class HostStack:
    def __init__(self, stack: dict, variables: dict, mounts: dict[str, Path] | None = None):
        self.services = stack["services"]
        self.variables = variables
        self.mounts = mounts  # volume target -> host directory (processes); None: containers mount them
        self.ports = {(name, port): free_port() for name, svc in self.services.items()
                      for port in [*(p for _, p in validate_deploy.published_ports(svc)),
                                   *(int(p) for p in svc.get("expose", []))]}

    def host_port(self, service: str, container_port: int) -> int:
        return self.ports[(service, container_port)]

    def map_value(self, service: str, value) -> str:
        text = interpolate(value, self.variables)
        for (name, port), host_port in self.ports.items():
            text = re.sub(rf"\b{re.escape(name)}:{port}\b", f"127.0.0.1:{host_port}", text)  # other services
            if name == service:  # this service's own listening port
                text = re.sub(rf"\b(?:127\.0\.0\.1|localhost):{port}\b", f"127.0.0.1:{host_port}", text)
                text = str(host_port) if text == str(port) else text
        for volume in self.services[service].get("volumes", []):
            interpolate(volume["source"], self.variables)  # the variables compose requires are set
            target = volume["target"]
            if self.mounts is not None and (text == target or text.startswith(target + "/")):
                text = str(self.mounts[target]) + text[len(target):]
        return "127.0.0.1" if text == "0.0.0.0" else text

    def map_argv(self, service: str, argv: list) -> list[str]:
        return [self.map_value(service, arg) for arg in argv]

    def environment(self, service: str) -> dict[str, str]:
        return {k: self.map_value(service, v) for k, v in (self.services[service].get("environment") or {}).items()}

    def start_order(self) -> list[str]:
        order: list[str] = []

        def visit(name):
            for dependency in (self.services[name].get("depends_on") or {}):
                visit(dependency)
            if name not in order:
                order.append(name)
        for name in self.services:
            visit(name)
        return order

    def healthcheck(self, service: str) -> tuple[list[str], dict[str, float]]:
        """The declared exec-form health check, mapped, and its timing in seconds."""
        check = self.services[service]["healthcheck"]
        assert check["test"][0] == "CMD", "healthchecks use the exec form"
        seconds = validate_deploy.duration_seconds
        timing = {"interval": seconds(check.get("interval", "30s")), "timeout": seconds(check.get("timeout", "30s")),
                  "start_period": seconds(check.get("start_period", "0s")), "retries": check.get("retries", 3)}
        timing["limit"] = timing["start_period"] + timing["retries"] * timing["interval"]
        return self.map_argv(service, check["test"][1:]), timing

    def stop_grace(self, service: str) -> float:
        return validate_deploy.duration_seconds(self.services[service].get("stop_grace_period", "10s"))
