#!/usr/bin/env python
"""Validate the deployment files offline: images, docker-compose, Kubernetes.

- docker-compose.yml (alone and merged with each deploy/compose.*.yaml override)
  against the vendored Compose Specification schema, plus what the stack needs
  (health checks, read-only model volume, preproc waiting for a healthy model
  service, a GPU reservation the CPU override removes, a stop grace longer than the drain);
- each Kubernetes overlay, rendered by a small kustomize subset (resources,
  images, strategic-merge patches), against the Kubernetes JSON schemas of the
  `kubernetes-validate` package, plus gRPC probes, security context, grace period
  versus drain time, headless Service, HPA, PDBs and the GPU request;
- the Dockerfiles: non-root user, grpc.health.v1 HEALTHCHECK, entry point;
- every MODEL_SERVICE_* / PREPROC_* variable set anywhere is one the service's
  `--help` lists.

Exit status 0 when all is well; otherwise each problem is printed and the status is 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_OVERRIDES = sorted((ROOT / "deploy").glob("compose.*.yaml"))
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
K8S_OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
DOCKERFILES = {"model_service": ROOT / "deploy" / "model_service.Dockerfile",
               "preproc_service": ROOT / "deploy" / "preproc_service.Dockerfile"}
ENV_PREFIXES = {"MODEL_SERVICE_": "model_service", "PREPROC_": "preproc_service"}
# Oldest Kubernetes release the manifests target, and the newest the schemas know.
K8S_VERSIONS = ("1.29.0", "latest")
HEALTH_PROBE = "splitserve_common.health_probe"


# ---------------------------------------------------------------- compose

class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` and `!override` merge tags."""


class Reset:
    """`key: !reset ...` in an override file removes the key from the merged result."""


class Override:
    def __init__(self, value):
        self.value = value


def _construct_reset(loader, node):
    return Reset()


def _construct_override(loader, node):
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_override)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader) or {}


def merge_compose(base, override):
    """Compose's merge rules for the parts used here: mappings merge, `!reset` removes,
    `!override` replaces, sequences of volumes merge by target, other sequences append."""
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge_key(key, merged[key], value)
            else:
                merged[key] = copy.deepcopy(value.value if isinstance(value, Override) else value)
        return merged
    return copy.deepcopy(override)


def _merge_key(key, base, override):
    if isinstance(base, list) and isinstance(override, list):
        if key == "volumes":
            by_target = {_volume_target(v): v for v in base}
            by_target.update({_volume_target(v): v for v in override})
            return list(by_target.values())
        if key in ("ports", "command", "entrypoint"):
            return copy.deepcopy(override) if key != "ports" else [*base, *override]
        return [*base, *override]
    return merge_compose(base, override)


def _volume_target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]


def _strip_extensions(document: dict) -> dict:
    """Top-level `x-` keys are YAML anchors' homes, allowed by the schema but not part of the stack."""
    return {k: v for k, v in document.items() if not k.startswith("x-")}


def compose_variants() -> dict[str, dict]:
    """The stacks one can run: the base file alone and merged with each override."""
    base = load_compose(COMPOSE_FILE)
    variants = {COMPOSE_FILE.name: base}
    for override in COMPOSE_OVERRIDES:
        variants[f"{COMPOSE_FILE.name} + {override.relative_to(ROOT)}"] = merge_compose(base, load_compose(override))
    return variants


def duration_seconds(text) -> float:
    """Compose durations: '1m30s', '30s', '500ms'."""
    total = 0.0
    for amount, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(text)):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def check_compose(problems: list[str], env_names: dict[str, set[str] | None]) -> None:
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for override in COMPOSE_OVERRIDES:  # override files on their own are partial compose files
        _schema_errors(problems, validator, str(override.relative_to(ROOT)), _plain(load_compose(override)))
    for name, stack in compose_variants().items():
        _schema_errors(problems, validator, name, _plain(stack))
        check_stack(problems, name, _strip_extensions(stack), env_names)


def _plain(value):
    """Reset/Override markers as the schema sees them (an empty mapping / the value)."""
    if isinstance(value, Reset):
        return {}
    if isinstance(value, Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _schema_errors(problems, validator, name, document) -> None:
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path)):
        where = "/".join(map(str, error.path)) or "(top)"
        problems.append(f"{name}: compose schema: {where}: {error.message}")


def check_stack(problems, name, stack, env_names) -> None:
    services = stack.get("services", {})
    model, preproc = services.get("model-service"), services.get("preproc")
    if model is None or preproc is None:
        problems.append(f"{name}: services 'model-service' and 'preproc' are both needed")
        return
    for svc_name, svc in services.items():
        where = f"{name}: service {svc_name}"
        test = (svc.get("healthcheck") or {}).get("test") or []
        if HEALTH_PROBE not in " ".join(map(str, test)):
            problems.append(f"{where}: healthcheck must run python -m {HEALTH_PROBE} (grpc.health.v1)")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        model_dirs = [v for k, v in env.items() if k.endswith("_MODEL_DIR")]
        mounts = [v for v in svc.get("volumes", []) if isinstance(v, dict) and v.get("target") in model_dirs]
        if not mounts or not all(m.get("read_only") for m in mounts):
            problems.append(f"{where}: the model directory must be mounted read-only at its *_MODEL_DIR")
        drain = max((float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")), default=25.0)
        if duration_seconds(svc.get("stop_grace_period", "10s")) <= drain:
            problems.append(f"{where}: stop_grace_period must exceed the drain time ({drain:g}s)")
        _check_env_names(problems, where, env, env_names)
    if (preproc.get("depends_on") or {}).get("model-service", {}).get("condition") != "service_healthy":
        problems.append(f"{name}: preproc must depend on model-service with condition service_healthy")
    gpu = any(d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])
              for d in ((model.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])))
    wants_cpu = "cpu" in name
    if gpu == wants_cpu:
        problems.append(f"{name}: model-service GPU reservation should be {'absent' if wants_cpu else 'present'}")
    if str(model.get("build", {}).get("args", {}).get("VARIANT", "cuda")) != ("cpu" if wants_cpu else "cuda"):
        problems.append(f"{name}: model-service build arg VARIANT should be {'cpu' if wants_cpu else 'cuda'}")


def _check_env_names(problems, where, env: dict, env_names) -> None:
    for key in env:
        for prefix, module in ENV_PREFIXES.items():
            known = env_names.get(module)
            if key.startswith(prefix) and known is not None and key not in known:
                problems.append(f"{where}: {key} is not a setting of {module} (see `python -m {module} --help`)")


def service_env_names(module: str) -> set[str] | None:
    """Environment variables that `python -m module --help` lists; None when the module is not there yet."""
    if not (ROOT / module).is_dir():
        return None
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    if result.returncode != 0:
        raise RuntimeError(f"`python -m {module} --help` failed:\n{result.stderr[-2000:]}")
    return set(re.findall(r"\benv\s+([A-Z0-9_]+)", result.stdout))


# ---------------------------------------------------------------- kustomize (the subset used here)

def render_kustomization(directory: Path) -> list[dict]:
    """Render a kustomization directory: resources (files or kustomization dirs), images, patches."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "images", "patches"}
    if unsupported:
        raise ValueError(f"{directory}: kustomization fields not supported by this renderer: {sorted(unsupported)}")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render_kustomization(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path: file` (strategic merge) is supported")
        for patch in yaml.safe_load_all((directory / patch_entry["path"]).read_text()):
            target = _find(objects, patch)
            target.update(strategic_merge(target, patch))
    for image in spec.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                _retag(container, image)
    return objects


def _find(objects: list[dict], patch: dict) -> dict:
    for obj in objects:
        if (obj.get("kind"), obj["metadata"]["name"]) == (patch.get("kind"), patch["metadata"]["name"]):
            return obj
    raise ValueError(f"patch target {patch.get('kind')}/{patch['metadata']['name']} not found")


# Lists whose items a strategic merge patch matches by a key (the others are replaced).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "envFrom": None}


def strategic_merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and MERGE_KEYS.get(key):
        merge_key = MERGE_KEYS[key]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = next((i for i, b in enumerate(merged) if b.get(merge_key) == item.get(merge_key)), None)
            if match is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[match] = strategic_merge(merged[match], item)
        return merged
    return copy.deepcopy(patch)


def _containers(obj: dict) -> list[dict]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("containers", []), *pod.get("initContainers", [])]


def _retag(container: dict, image: dict) -> None:
    name, _, tag = container["image"].partition(":")
    if name != image["name"]:
        return
    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"


def kubectl_render(directory: Path) -> list[dict] | None:
    """`kubectl kustomize` output, when kubectl is installed (a cross-check of the renderer above)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed: {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _identity(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# ---------------------------------------------------------------- Kubernetes checks

def check_k8s(problems: list[str], env_names: dict[str, set[str] | None], cross_check: bool) -> None:
    for overlay in sorted(p for p in K8S_OVERLAYS.iterdir() if p.is_dir()):
        where = f"k8s overlay {overlay.name}"
        try:
            objects = render_kustomization(overlay)
        except (ValueError, OSError, yaml.YAMLError) as exc:
            problems.append(f"{where}: cannot render: {exc}")
            continue
        if cross_check:
            reference = kubectl_render(overlay)
            if reference is not None:
                ours = {_identity(o): o for o in objects}
                theirs = {_identity(o): o for o in reference}
                if ours != theirs:
                    differing = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
                    problems.append(f"{where}: renderer differs from `kubectl kustomize` on {differing}")
        for obj in objects:
            problems.extend(f"{where}: {problem}" for problem in k8s_schema_problems(obj))
        check_cluster(problems, where, overlay.name, objects, env_names)


def k8s_schema_problems(obj: dict) -> list[str]:
    """What the Kubernetes JSON schemas (strict: no unknown fields) say about one object."""
    import kubernetes_validate

    problems = []
    for version in K8S_VERSIONS:
        desired = kubernetes_validate.latest_version() if version == "latest" else version
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} (k8s {desired})"
        try:
            kubernetes_validate.validate(obj, desired, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(map(str, getattr(exc, "path", ())))
            problems.append(f"{name}: {path} {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"{name}: no schema: {exc}")
    return problems


def _by_kind(objects, kind):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def check_cluster(problems, where, overlay, objects, env_names) -> None:
    deployments = _by_kind(objects, "Deployment")
    services = _by_kind(objects, "Service")
    config = {}
    for cm in _by_kind(objects, "ConfigMap").values():
        config.update(cm.get("data", {}))
    _check_env_names(problems, f"{where}: ConfigMap", config, env_names)
    for name in ("model-service", "preproc"):
        deployment = deployments.get(name)
        if deployment is None:
            problems.append(f"{where}: Deployment {name} missing")
            continue
        _check_deployment(problems, f"{where}: Deployment {name}", deployment, config)
        if not any(p["spec"]["selector"]["matchLabels"].items() <= _pod_labels(deployment).items()
                   for p in _by_kind(objects, "PodDisruptionBudget").values()):
            problems.append(f"{where}: no PodDisruptionBudget selects Deployment {name}")
    model_svc = services.get("model-service", {})
    if model_svc.get("spec", {}).get("clusterIP") != "None":
        problems.append(f"{where}: Service model-service must be headless (clusterIP: None) for per-call balancing")
    if "preproc" not in services:
        problems.append(f"{where}: Service preproc missing")
    target = config.get("PREPROC_MODEL_SERVICE", "")
    if not target.startswith("dns:///model-service:"):
        problems.append(f"{where}: PREPROC_MODEL_SERVICE should be dns:///model-service:PORT, not {target!r}")
    hpas = [h for h in _by_kind(objects, "HorizontalPodAutoscaler").values()
            if h["spec"]["scaleTargetRef"]["name"] == "preproc"]
    if not hpas:
        problems.append(f"{where}: no HorizontalPodAutoscaler for preproc")
    gpu = _gpu_limit(deployments.get("model-service"))
    if overlay == "gpu" and not gpu:
        problems.append(f"{where}: model-service must request nvidia.com/gpu")
    if overlay != "gpu" and gpu:
        problems.append(f"{where}: model-service must not request nvidia.com/gpu")
    if gpu and _gpu_limit(deployments.get("preproc")):
        problems.append(f"{where}: preproc must not request a GPU")


def _pod_labels(deployment) -> dict:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def _gpu_limit(deployment) -> bool:
    if deployment is None:
        return False
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(deployment))


def _check_deployment(problems, where, deployment, config) -> None:
    pod = deployment["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    prefix = "MODEL_SERVICE_" if deployment["metadata"]["name"] == "model-service" else "PREPROC_"
    port = int(config.get(prefix + "PORT", 0))
    drain = float(config.get(prefix + "DRAIN_SECONDS", 25))
    for container in pod["containers"]:
        cwhere = f"{where} container {container['name']}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = container.get(probe, {}).get("grpc")
            if not grpc_probe:
                problems.append(f"{cwhere}: {probe} must be a native gRPC probe")
            elif grpc_probe.get("port") != port:
                problems.append(f"{cwhere}: {probe} asks port {grpc_probe.get('port')}, the service listens on {port}")
        security = container.get("securityContext", {})
        if not (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            problems.append(f"{cwhere}: must run as non-root (runAsNonRoot: true)")
        if not security.get("readOnlyRootFilesystem"):
            problems.append(f"{cwhere}: readOnlyRootFilesystem must be true")
        if not container.get("envFrom"):
            problems.append(f"{cwhere}: settings should come from the ConfigMap (envFrom)")
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre_stop[1]) if len(pre_stop) == 2 and pre_stop[0] == "sleep" else 0.0
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < pause + drain:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} < preStop {pause:g}s + drain {drain:g}s")
        if not container.get("resources", {}).get("requests"):
            problems.append(f"{cwhere}: resources.requests missing (the HPA and the scheduler need them)")


# ---------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            result.append((instruction.upper(), rest.strip()))
    return result


def dockerfile_entrypoint(path: Path) -> list[str]:
    entry = [rest for inst, rest in dockerfile_instructions(path) if inst == "ENTRYPOINT"]
    return json.loads(entry[-1]) if entry else []


def check_dockerfiles(problems: list[str]) -> None:
    for module, path in DOCKERFILES.items():
        where = str(path.relative_to(ROOT))
        instructions = dockerfile_instructions(path)
        final_stage = instructions[max(i for i, (inst, _) in enumerate(instructions) if inst == "FROM"):]
        users = [rest for inst, rest in final_stage if inst == "USER"]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(f"{where}: the final stage must switch to a non-root USER")
        health = [rest for inst, rest in final_stage if inst == "HEALTHCHECK"]
        if not health or HEALTH_PROBE not in health[-1]:
            problems.append(f"{where}: HEALTHCHECK must run python -m {HEALTH_PROBE}")
        if dockerfile_entrypoint(path) != ["python", "-m", module]:
            problems.append(f"{where}: ENTRYPOINT should be [\"python\", \"-m\", \"{module}\"]")
        if module == "preproc_service" and re.search(r"\.\[[^\]]*model|torch", " ".join(
                rest for inst, rest in instructions if inst == "RUN").replace('import torch', '')):
            problems.append(f"{where}: the preproc image must not install torch or the model extra")
        if module == "model_service" and not any(inst == "ARG" and rest.startswith("VARIANT")
                                                 for inst, rest in instructions):
            problems.append(f"{where}: needs a VARIANT build argument (cuda | cpu)")


# ---------------------------------------------------------------- main

def validate(cross_check: bool = True) -> list[str]:
    problems: list[str] = []
    env_names: dict[str, set[str] | None] = {}
    for module in ENV_PREFIXES.values():
        try:
            env_names[module] = service_env_names(module)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
            env_names[module] = None
    check_dockerfiles(problems)
    check_compose(problems, env_names)
    check_k8s(problems, env_names, cross_check)
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-kubectl", action="store_true",
                        help="skip the cross-check of the kustomize renderer against `kubectl kustomize`")
    args = parser.parse_args(argv)
    problems = validate(cross_check=not args.no_kubectl)
    for problem in problems:
        print(f"FAIL {problem}")
    overlays = ", ".join(sorted(p.name for p in K8S_OVERLAYS.iterdir() if p.is_dir()))
    print(f"checked: {len(DOCKERFILES)} Dockerfiles, docker-compose.yml + {len(COMPOSE_OVERRIDES)} overrides, "
          f"k8s overlays ({overlays}) against Kubernetes {', '.join(K8S_VERSIONS)}: "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
