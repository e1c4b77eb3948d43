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
  `--help` lists;
- the Grafana dashboards in deploy/grafana/: panels with ids and positions, queries on the
  `datasource` variable, every splitserve_* metric they query exported by a service.

Exit status 0 when all is well; otherwise each problem is printed and the status is 1.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_OVERRIDES = sorted((ROOT / "deploy").glob("compose.*.yaml"))
SCHEMAS = ROOT / "deploy" / "schemas"
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"
K8S_OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
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
        env = _environment(svc)
        model_dirs = [v for k, v in env.items() if k.endswith("_MODEL_DIR")]
        mounts = [v for v in svc.get("volumes", []) if isinstance(v, dict) and v.get("target") in model_dirs]
        if not mounts or not all(m.get("read_only") for m in mounts):
            problems.append(f"{where}: the model directory must be mounted read-only at its *_MODEL_DIR")
        drain = max((float(v) for k, v in env.items() if k.endswith("_DRAIN_SECONDS")), default=25.0)
        if duration_seconds(svc.get("stop_grace_period", "10s")) <= drain:
            problems.append(f"{where}: stop_grace_period must exceed the drain time ({drain:g}s)")
        _check_env_names(problems, where, env, env_names)
    check_published_ports(problems, name, services)
    check_compose_images(problems, name, services)
    if (preproc.get("depends_on") or {}).get("model-service", {}).get("condition") != "service_healthy":
        problems.append(f"{name}: preproc must depend on model-service with condition service_healthy")
    gpu = any(d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])
              for d in ((model.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])))
    wants_cpu = "cpu" in name
    if gpu == wants_cpu:
        problems.append(f"{name}: model-service GPU reservation should be {'absent' if wants_cpu else 'present'}")
    if str(model.get("build", {}).get("args", {}).get("VARIANT", "cuda")) != ("cpu" if wants_cpu else "cuda"):
        problems.append(f"{name}: model-service build arg VARIANT should be {'cpu' if wants_cpu else 'cuda'}")


def published_ports(service: dict) -> list[tuple[str, int]]:
    """(host address, container port) of each published port; "" is every interface."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((str(port.get("host_ip", "")), int(port["target"])))
            continue
        parts = str(port).split("/")[0].rsplit(":", 2)
        host_ip = parts[0].strip("[]") if len(parts) == 3 else ""
        result.append((host_ip, int(parts[-1])))
    return result


def check_published_ports(problems, name, services) -> None:
    """Only preproc is published, on loopback; its gRPC and HTTP ports may face the network only behind
    mutual TLS and the bearer token (deploy/compose.tls.yaml). Nothing else ever leaves loopback."""
    for svc_name, svc in services.items():
        env = _environment(svc)
        guarded = bool(env.get("PREPROC_TLS_CLIENT_CA") or env.get("PREPROC_TLS_CERT")) and bool(
            env.get("PREPROC_AUTH_TOKEN"))
        for host_ip, port in published_ports(svc):
            if svc_name != "preproc":
                problems.append(f"{name}: service {svc_name} publishes port {port}: only preproc faces the host")
            elif host_ip not in ("127.0.0.1", "::1", "localhost") and not (
                    guarded and str(port) in (str(env.get("PREPROC_PORT")), str(env.get("PREPROC_HTTP_PORT")))):
                problems.append(f"{name}: preproc publishes port {port} on every interface without TLS and a token; "
                                f"bind it to 127.0.0.1")


def check_compose_images(problems, name, services) -> None:
    version = package_version()
    for svc_name, svc in services.items():
        tag = str(svc.get("image", "")).rpartition(":")[2]
        if tag != version and not tag.startswith(version + "-"):
            problems.append(f"{name}: service {svc_name} image {svc.get('image')!r} should be tagged with the "
                            f"package version {version}")


def _environment(service: dict) -> dict:
    env = service.get("environment") or {}
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


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
    """Render a kustomization directory: resources (files or kustomization dirs), configMapGenerator,
    images, patches."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unsupported = set(spec) - {"apiVersion", "kind", "resources", "images", "patches", "configMapGenerator"}
    if unsupported:
        raise ValueError(f"{directory}: kustomization fields not supported by this renderer: {sorted(unsupported)}")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render_kustomization(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    renamed: dict[str, str] = {}
    for generator in spec.get("configMapGenerator", []):
        config_map = generate_config_map(directory, generator)
        renamed[generator["name"]] = config_map["metadata"]["name"]
        objects.append(config_map)
    for obj in objects:
        for ref in _config_map_refs(obj):
            ref["name"] = renamed.get(ref["name"], ref["name"])
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


def generate_config_map(directory: Path, generator: dict) -> dict:
    """A configMapGenerator entry (`envs` files and `literals`; options labels/annotations), named
    NAME-HASH as kustomize names it, so that a change of the data changes every reference."""
    unsupported = set(generator) - {"name", "envs", "literals", "options"}
    if unsupported or set(generator.get("options", {})) - {"labels", "annotations"}:
        raise ValueError(f"{directory}: configMapGenerator fields not supported by this renderer: {generator}")
    data: dict[str, str] = {}
    lines = [line for env_file in generator.get("envs", []) for line in (directory / env_file).read_text().splitlines()]
    for line in [*lines, *generator.get("literals", [])]:
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{directory}: configMapGenerator line without '=': {line!r}")
            data[key] = value
    metadata = {"name": f"{generator['name']}-{config_map_hash(data)}"}
    for field in ("labels", "annotations"):
        if generator.get("options", {}).get(field):
            metadata[field] = dict(generator["options"][field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix (api/hasher): sha256 of Go's json.Marshal of {data, kind, name}, first ten
    hex digits with 0 1 3 a e spelt g h k m t. Its lookup of `metadata/name` finds nothing, so name is ""."""
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):  # Go escapes HTML
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _config_map_refs(obj: dict) -> list[dict]:
    """The {name: ...} mappings in a pod template that name a ConfigMap (kustomize's name references)."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    refs = [v["configMap"] for v in pod.get("volumes", []) if "configMap" in v]
    for container in [*pod.get("containers", []), *pod.get("initContainers", [])]:
        refs += [e["configMapRef"] for e in container.get("envFrom", []) if "configMapRef" in e]
        refs += [e["valueFrom"]["configMapKeyRef"] for e in container.get("env", [])
                 if "configMapKeyRef" in e.get("valueFrom", {})]
    return refs


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
    """What the schemas (strict: no unknown fields) say about one object: the Kubernetes JSON schemas
    for built-in kinds, the CRDs kept in deploy/schemas/ for custom resources."""
    import kubernetes_validate

    crd_schema = crd_schemas().get((obj.get("apiVersion"), obj.get("kind")))
    if crd_schema is not None:
        return crd_schema_problems(obj, crd_schema)
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


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of every served version of the CRDs in deploy/schemas/."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _strict(schema):
    """The CRD schema with unknown fields refused (as `kubectl apply --validate=strict` does): every object
    that lists its properties and does not keep unknown fields gets additionalProperties: false."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


def crd_schema_problems(obj: dict, schema: dict) -> list[str]:
    """OpenAPI v3 structural schema checks (types, enums, required, patterns, bounds); the CEL rules
    (x-kubernetes-validations) are the API server's and are not evaluated here."""
    import jsonschema

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} ({obj.get('apiVersion')} CRD)"
    problems = []
    for error in sorted(jsonschema.Draft4Validator(schema).iter_errors(obj), key=lambda e: list(e.path)):
        problems.append(f"{name}: {'/'.join(map(str, error.path))} {error.message}")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", str(obj.get("metadata", {}).get("name", ""))):
        problems.append(f"{name}: metadata.name must be a DNS subdomain")
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
    wants_gpu = overlay.split("-")[0] == "gpu"
    if wants_gpu and not gpu:
        problems.append(f"{where}: model-service must request nvidia.com/gpu")
    if not wants_gpu and gpu:
        problems.append(f"{where}: model-service must not request nvidia.com/gpu")
    if gpu and _gpu_limit(deployments.get("preproc")):
        problems.append(f"{where}: preproc must not request a GPU")
    for check in (_check_images, _check_generated_config, _check_model_name, _check_disruption_budgets,
                  _check_service_accounts, _check_preproc_balancing, _check_network_policies,
                  _check_queue_scaling, _check_service_monitors, _check_routes):
        check(problems, where, objects, config)


# Each check below takes (problems, where, rendered objects, merged ConfigMap data).

def package_version() -> str:
    import tomllib  # Python 3.11+; the validators run on the project's venv

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _check_images(problems, where, objects, config) -> None:
    """Images are tagged with the package version (model_service: VERSION-VARIANT), never :latest."""
    version = package_version()
    for obj in objects:
        for container in _containers(obj):
            name, _, tag = container["image"].rpartition(":") if ":" in container["image"] else (
                container["image"], "", "")
            if tag != version and not tag.startswith(version + "-"):
                problems.append(f"{where}: {obj['kind']} {obj['metadata']['name']} image {container['image']!r} "
                                f"should be tagged with the package version {version}")


def _check_generated_config(problems, where, objects, config) -> None:
    """The settings ConfigMap comes from a configMapGenerator (name-HASH), so a change rolls the pods."""
    config_maps = _by_kind(objects, "ConfigMap")
    for deployment in _by_kind(objects, "Deployment").values():
        for ref in _config_map_refs(deployment):
            if ref["name"] not in config_maps:
                problems.append(f"{where}: Deployment {deployment['metadata']['name']} refers to ConfigMap "
                                f"{ref['name']}, which the overlay does not define")
            elif not re.fullmatch(r".+-[a-z0-9]{10}", ref["name"]):
                problems.append(f"{where}: ConfigMap {ref['name']} should come from a configMapGenerator "
                                f"(a name with the content hash rolls the pods on a change)")


def _check_model_name(problems, where, objects, config) -> None:
    name = config.get("MODEL_SERVICE_MODEL_NAME", "")
    if name in ("", "model"):
        directory = os.path.basename(config.get("MODEL_SERVICE_MODEL_DIR", ""))
        problems.append(f"{where}: set MODEL_SERVICE_MODEL_NAME to the model's name (without it every "
                        f"deployment serves one called {directory!r})")
    if config.get("PREPROC_MODEL_NAME", name) != name:
        problems.append(f"{where}: PREPROC_MODEL_NAME {config['PREPROC_MODEL_NAME']!r} is not the name model_service "
                        f"serves ({name!r})")


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def _check_disruption_budgets(problems, where, objects, config) -> None:
    """Each PDB keeps at least one pod through voluntary disruptions, even at the lowest replica count."""
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"].get("minReplicaCount", 0)
              for s in _by_kind(objects, "ScaledObject").values()}
    hpa_min = {h["spec"]["scaleTargetRef"]["name"]: h["spec"].get("minReplicas", 1)
               for h in _by_kind(objects, "HorizontalPodAutoscaler").values()}
    for name, deployment in _by_kind(objects, "Deployment").items():
        fewest = scaled.get(name, hpa_min.get(name, deployment["spec"].get("replicas", 1)))
        for pdb in _by_kind(objects, "PodDisruptionBudget").values():
            if not _selects(pdb["spec"]["selector"], _pod_labels(deployment)):
                continue
            spec = pdb["spec"]
            keeps = (int(spec["minAvailable"]) if "minAvailable" in spec
                     else fewest - int(spec.get("maxUnavailable", fewest)))
            if keeps < 1:
                problems.append(f"{where}: PodDisruptionBudget {pdb['metadata']['name']} lets a drain evict every pod "
                                f"of {name} at {fewest} replica(s): use minAvailable: 1")
        strategy = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
        if fewest == 1 and str(strategy.get("maxUnavailable", "25%")) not in ("0", "0%"):
            problems.append(f"{where}: Deployment {name} runs one replica: its rollout needs maxUnavailable: 0")


def _check_service_accounts(problems, where, objects, config) -> None:
    accounts = _by_kind(objects, "ServiceAccount")
    for name, deployment in _by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        account = accounts.get(pod.get("serviceAccountName", "default"))
        if account is None:
            problems.append(f"{where}: Deployment {name} should run under a ServiceAccount of the overlay")
        automount = pod.get("automountServiceAccountToken", (account or {}).get("automountServiceAccountToken", True))
        if automount is not False:
            problems.append(f"{where}: Deployment {name} mounts a service account token it does not need")


def _check_preproc_balancing(problems, where, objects, config) -> None:
    """In-cluster clients get a headless Service (dns:/// + round_robin); replicas spread over nodes."""
    preproc = _by_kind(objects, "Deployment").get("preproc")
    if preproc is None:
        return
    labels = _pod_labels(preproc)
    if not any(s["spec"].get("clusterIP") == "None" and s["spec"].get("selector", {}).items() <= labels.items()
               and any(p.get("name") == "grpc" for p in s["spec"].get("ports", []))
               for s in _by_kind(objects, "Service").values()):
        problems.append(f"{where}: no headless Service (clusterIP: None) with a grpc port selects preproc's pods")
    spread = preproc["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    if not any(c.get("topologyKey") == "kubernetes.io/hostname" and _selects(c.get("labelSelector", {}), labels)
               for c in spread):
        problems.append(f"{where}: preproc needs a topologySpreadConstraint over kubernetes.io/hostname "
                        f"selecting its own pods")


def _named_ports(deployment) -> dict:
    return {p["name"]: p["containerPort"] for c in _containers(deployment) for p in c.get("ports", []) if "name" in p}


def _check_network_policies(problems, where, objects, config) -> None:
    """model_service's gRPC port only from preproc pods; every metrics port only from namespace monitoring."""
    deployments = _by_kind(objects, "Deployment")

    def only_preproc(peers) -> bool:  # pods of this namespace that are preproc's and no one else's
        return bool(peers) and all(set(peer) == {"podSelector"} and all(
            _selects(peer["podSelector"], _pod_labels(d)) == (name == "preproc") for name, d in deployments.items())
            for peer in peers)

    def only_monitoring(peers) -> bool:
        return bool(peers) and all(peer == {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}} for peer in peers)

    for name, deployment in deployments.items():
        policies = [p for p in _by_kind(objects, "NetworkPolicy").values()
                    if p["spec"]["podSelector"].get("matchLabels", {}).items() <= _pod_labels(deployment).items()
                    and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
        if not policies:
            problems.append(f"{where}: no NetworkPolicy restricts ingress to {name}")
            continue
        for port_name, port in _named_ports(deployment).items():
            allowed = [rule.get("from") for p in policies for rule in p["spec"].get("ingress", [])
                       if not rule.get("ports") or any(rp.get("port") in (port_name, port) for rp in rule["ports"])]
            if port_name == "metrics":
                wanted, who = only_monitoring, "the monitoring namespace"
            elif name == "model-service" and port_name == "grpc":
                wanted, who = only_preproc, "preproc's pods"
            else:
                continue
            if not allowed or not all(wanted(peers) for peers in allowed):
                problems.append(f"{where}: NetworkPolicy lets {allowed or 'nobody'} reach {name} port {port_name}; "
                                f"only {who} should")


@functools.cache
def declared_metrics() -> frozenset[str]:
    """Metric names the services declare (any "splitserve_..." string in their code)."""
    names = set()
    for package in ("splitserve_common", "model_service", "preproc_service"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](splitserve_[a-z0-9_]+)[\"']", path.read_text()))
    return frozenset(names)


def unknown_metrics(query: str) -> list[str]:
    """splitserve_* names in a PromQL query that no service exports (histogram and counter suffixes allowed)."""
    return [name for name in re.findall(r"splitserve_[a-z0-9_]+", query)
            if name not in declared_metrics() and re.sub(r"_(bucket|sum|count|created)$", "", name)
            not in declared_metrics()]


def check_dashboard(problems: list[str], path: Path, dashboard: dict) -> None:
    where = f"{path.relative_to(ROOT)}"
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append(f"{where}: needs a `datasource` variable of type datasource (Prometheus)")
    ids = [panel.get("id") for panel in dashboard.get("panels", [])]
    if not ids or len(set(ids)) != len(ids):
        problems.append(f"{where}: panels need unique ids")
    for panel in dashboard.get("panels", []):
        pwhere = f"{where}: panel {panel.get('id')} {panel.get('title')!r}"
        if not {"x", "y", "w", "h"} <= set(panel.get("gridPos", {})):
            problems.append(f"{pwhere}: gridPos needs x, y, w, h")
        if not panel.get("targets"):
            problems.append(f"{pwhere}: no queries")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{pwhere}: query {target.get('refId')} should use the ${{datasource}} variable")
            for name in unknown_metrics(target.get("expr", "")):
                problems.append(f"{pwhere}: queries {name}, which no service exports")
    for variable in variables.values():
        for name in unknown_metrics(str(variable.get("definition", ""))):
            problems.append(f"{where}: variable {variable['name']} queries {name}, which no service exports")


def check_dashboards(problems: list[str]) -> None:
    for path in DASHBOARDS:
        try:
            dashboard = json.loads(path.read_text())
        except ValueError as exc:
            problems.append(f"{path.relative_to(ROOT)}: not JSON: {exc}")
            continue
        check_dashboard(problems, path, dashboard)


def _check_queue_scaling(problems, where, objects, config) -> None:
    """A ScaledObject drives model-service from metrics the service exports; no second HPA fights it."""
    for scaled in _by_kind(objects, "ScaledObject").values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        if target not in _by_kind(objects, "Deployment"):
            problems.append(f"{where}: ScaledObject {scaled['metadata']['name']} scales {target}, not a Deployment")
        hpas = _by_kind(objects, "HorizontalPodAutoscaler").values()
        if any(h["spec"]["scaleTargetRef"]["name"] == target for h in hpas):
            problems.append(f"{where}: {target} has both a ScaledObject and a HorizontalPodAutoscaler")
        for trigger in scaled["spec"]["triggers"]:
            query = trigger.get("metadata", {}).get("query", "")
            for metric in unknown_metrics(query):
                problems.append(f"{where}: ScaledObject trigger {trigger.get('name')} queries {metric}, "
                                f"which no service exports")


def _check_service_monitors(problems, where, objects, config) -> None:
    services = _by_kind(objects, "Service").values()
    for monitor in _by_kind(objects, "ServiceMonitor").values():
        selected = [s for s in services if _selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(p.get("name") == endpoint.get("port") for s in selected for p in s["spec"]["ports"]):
                problems.append(f"{where}: ServiceMonitor {monitor['metadata']['name']} scrapes port "
                                f"{endpoint.get('port')!r}, which no Service it selects has")


def _check_routes(problems, where, objects, config) -> None:
    services, gateways = _by_kind(objects, "Service"), _by_kind(objects, "Gateway")
    for route in _by_kind(objects, "GRPCRoute").values():
        rname = f"GRPCRoute {route['metadata']['name']}"
        for parent in route["spec"].get("parentRefs", []):
            listeners = [li["name"] for li in gateways.get(parent["name"], {}).get("spec", {}).get("listeners", [])]
            if parent.get("sectionName", listeners[:1] and listeners[0]) not in listeners:
                problems.append(f"{where}: {rname} attaches to {parent}, which no Gateway listener here is")
        for rule in route["spec"].get("rules", []):
            for backend in rule.get("backendRefs", []):
                ports = [p["port"] for p in services.get(backend["name"], {}).get("spec", {}).get("ports", [])]
                if backend.get("port") not in ports:
                    problems.append(f"{where}: {rname} sends to Service {backend['name']} port {backend.get('port')}, "
                                    f"which does not exist")


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
    check_dashboards(problems)
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
          f"k8s overlays ({overlays}) against Kubernetes {', '.join(K8S_VERSIONS)}, "
          f"{len(DASHBOARDS)} Grafana dashboard(s): "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
