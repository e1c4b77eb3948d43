"""The deployment validators (scripts/validate_deploy.py) pass on the repository's files,
and catch what they are there to catch (issue 6, items 1-3 and 8)."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("validate_deploy", ROOT / "scripts" / "validate_deploy.py")
vd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vd)

NO_ENV_CHECK = {"model_service": None, "preproc_service": None}


def test_validate_deploy_script_passes():
    result = subprocess.run([sys.executable, "scripts/validate_deploy.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


# ---------------------------------------------------------------- compose

@pytest.fixture(scope="module")
def stacks():
    return vd.compose_variants()


def _stack_problems(name: str, stack: dict, env_names=NO_ENV_CHECK) -> list[str]:
    problems: list[str] = []
    vd.check_stack(problems, name, vd._strip_extensions(stack), env_names)
    return problems


def test_cpu_override_removes_the_gpu_reservation(stacks):
    base = stacks["docker-compose.yml"]["services"]["model-service"]
    cpu = stacks["docker-compose.yml + deploy/compose.cpu.yaml"]["services"]["model-service"]
    assert base["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert cpu["build"] == {**base["build"], "args": {"VARIANT": "cpu"}}
    assert cpu["environment"] == base["environment"]


def test_compose_checks_catch_broken_stacks(stacks):
    good = stacks["docker-compose.yml"]
    assert _stack_problems("docker-compose.yml", good) == []

    writable = copy.deepcopy(good)
    writable["services"]["preproc"]["volumes"][0]["read_only"] = False
    assert any("read-only" in p for p in _stack_problems("docker-compose.yml", writable))

    impatient = copy.deepcopy(good)
    impatient["services"]["preproc"]["depends_on"]["model-service"]["condition"] = "service_started"
    assert any("service_healthy" in p for p in _stack_problems("docker-compose.yml", impatient))

    short_grace = copy.deepcopy(good)
    short_grace["services"]["model-service"]["stop_grace_period"] = "10s"
    assert any("stop_grace_period" in p for p in _stack_problems("docker-compose.yml", short_grace))

    no_gpu = copy.deepcopy(good)
    del no_gpu["services"]["model-service"]["deploy"]
    assert any("GPU reservation" in p for p in _stack_problems("docker-compose.yml", no_gpu))

    published = copy.deepcopy(good)
    published["services"]["model-service"]["ports"] = ["127.0.0.1:8001:8001"]
    assert any("model-service publishes port 8001" in p for p in _stack_problems("docker-compose.yml", published))

    open_plain = copy.deepcopy(good)
    open_plain["services"]["preproc"]["ports"][0] = "8011:8011"
    assert any("every interface without TLS" in p for p in _stack_problems("docker-compose.yml", open_plain))
    tls = stacks["docker-compose.yml + deploy/compose.tls.yaml"]
    assert _stack_problems("tls", tls) == []  # the same port is fine behind mutual TLS and the token
    tls_no_token = copy.deepcopy(tls)
    del tls_no_token["services"]["preproc"]["environment"]["PREPROC_AUTH_TOKEN"]
    assert any("every interface without TLS" in p for p in _stack_problems("tls", tls_no_token))

    latest = copy.deepcopy(good)
    latest["services"]["preproc"]["image"] = "splitserve/preproc-service:latest"
    assert any("package version" in p for p in _stack_problems("docker-compose.yml", latest))

    misspelt = copy.deepcopy(good)
    misspelt["services"]["model-service"]["environment"]["MODEL_SERVICE_MODEL_DIRR"] = "/models/model"
    known = {"model_service": {"MODEL_SERVICE_MODEL_DIR", "MODEL_SERVICE_PORT"}, "preproc_service": None}
    assert any("MODEL_SERVICE_MODEL_DIRR is not a setting" in p
               for p in _stack_problems("docker-compose.yml", misspelt, known))


def test_compose_schema_rejects_unknown_keys(stacks):
    import jsonschema

    validator = jsonschema.Draft202012Validator(vd.json.loads(vd.COMPOSE_SCHEMA.read_text()))
    good = vd._plain(stacks["docker-compose.yml"])
    assert list(validator.iter_errors(good)) == []
    bad = copy.deepcopy(good)
    bad["services"]["preproc"]["helthcheck"] = bad["services"]["preproc"].pop("healthcheck")
    errors = list(validator.iter_errors(bad))
    assert errors and "helthcheck" in errors[0].message


def test_compose_merge_rules():
    base = {"services": {"a": {"deploy": {"x": 1}, "volumes": [{"target": "/m", "source": "s"}],
                               "environment": {"A": "1"}}}}
    override = {"services": {"a": {"deploy": vd.Reset(), "volumes": [{"target": "/c", "source": "c"}],
                                   "environment": {"B": "2"}}}}
    merged = vd.merge_compose(base, override)["services"]["a"]
    assert "deploy" not in merged
    assert [v["target"] for v in merged["volumes"]] == ["/m", "/c"]
    assert merged["environment"] == {"A": "1", "B": "2"}


# ---------------------------------------------------------------- kubernetes

@pytest.fixture(scope="module")
def rendered():
    return {overlay.name: vd.render_kustomization(overlay) for overlay in vd.K8S_OVERLAYS.iterdir()}


def _cluster_problems(overlay: str, objects: list[dict]) -> list[str]:
    problems: list[str] = []
    vd.check_cluster(problems, overlay, overlay, objects, NO_ENV_CHECK)
    return problems


def _deployment(objects, name):
    return next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name)


def test_overlays_differ_where_they_should(rendered):
    gpu_model = _deployment(rendered["gpu"], "model-service")["spec"]["template"]["spec"]
    cpu_model = _deployment(rendered["cpu"], "model-service")["spec"]["template"]["spec"]
    assert gpu_model["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    version = vd.package_version()
    assert gpu_model["containers"][0]["image"] == f"splitserve/model-service:{version}-cuda"
    assert cpu_model["containers"][0]["image"] == f"splitserve/model-service:{version}-cpu"
    assert "nvidia.com/gpu" not in cpu_model["containers"][0]["resources"].get("limits", {})
    # The strategic merge kept the base's container fields (probes, mounts) beside the patched resources.
    assert gpu_model["containers"][0]["readinessProbe"]["grpc"]["port"] == 8001
    assert [m["mountPath"] for m in gpu_model["containers"][0]["volumeMounts"]] == ["/models/model", "/tmp"]


def test_cluster_checks_catch_broken_manifests(rendered):
    good = rendered["gpu"]
    assert _cluster_problems("gpu", good) == []
    assert _cluster_problems("cpu", rendered["cpu"]) == []

    http_probe = copy.deepcopy(good)
    container = _deployment(http_probe, "preproc")["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": 8012}}
    assert any("livenessProbe must be a native gRPC probe" in p for p in _cluster_problems("gpu", http_probe))

    short_grace = copy.deepcopy(good)
    _deployment(short_grace, "model-service")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
    assert any("terminationGracePeriodSeconds" in p for p in _cluster_problems("gpu", short_grace))

    writable = copy.deepcopy(good)
    _deployment(writable, "model-service")["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"] = False
    assert any("readOnlyRootFilesystem" in p for p in _cluster_problems("gpu", writable))

    clustered = copy.deepcopy(good)
    next(o for o in clustered if o["kind"] == "Service" and o["metadata"]["name"] == "model-service")[
        "spec"].pop("clusterIP")
    assert any("headless" in p for p in _cluster_problems("gpu", clustered))

    assert any("must not request nvidia.com/gpu" in p for p in _cluster_problems("cpu", good))


def _named(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _broken(objects, change):
    broken = copy.deepcopy(objects)
    change(broken)
    return broken


def test_cluster_checks_catch_what_issue_14_asks(rendered):
    good = rendered["gpu-queue-scaling"]
    assert _cluster_problems("gpu-queue-scaling", good) == []

    def expect(fragment, change):
        problems = _cluster_problems("gpu-queue-scaling", _broken(good, change))
        assert any(fragment in p for p in problems), (fragment, problems)

    def container(objects, name):
        return _deployment(objects, name)["spec"]["template"]["spec"]["containers"][0]

    def pod(objects, name):
        return _deployment(objects, name)["spec"]["template"]["spec"]

    expect("tagged with the package version", lambda o: container(o, "preproc").update(
        image="splitserve/preproc-service:latest"))
    expect("configMapGenerator", lambda o: [
        _named(o, "ConfigMap", container(o, "preproc")["envFrom"][0]["configMapRef"]["name"])["metadata"].update(
            name="splitserve-config"),
        container(o, "preproc")["envFrom"][0]["configMapRef"].update(name="splitserve-config")])
    expect("MODEL_SERVICE_MODEL_NAME", lambda o: next(c for c in o if c["kind"] == "ConfigMap")["data"].pop(
        "MODEL_SERVICE_MODEL_NAME"))
    expect("lets a drain evict every pod of model-service", lambda o: _named(
        o, "PodDisruptionBudget", "model-service").update(spec={
            "maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "model-service"}}}))
    expect("maxUnavailable: 0", lambda o: _deployment(o, "model-service")["spec"].pop("strategy"))
    expect("service account token", lambda o: [pod(o, "preproc").pop("automountServiceAccountToken"),
                                               _named(o, "ServiceAccount", "splitserve").pop(
                                                   "automountServiceAccountToken")])
    expect("should run under a ServiceAccount", lambda o: pod(o, "model-service").pop("serviceAccountName"))
    expect("headless Service", lambda o: o.remove(_named(o, "Service", "preproc-headless")))
    expect("topologySpreadConstraint", lambda o: pod(o, "preproc").pop("topologySpreadConstraints"))
    # model_service's gRPC port opened to every pod of the namespace, or to all namespaces.
    expect("reach model-service port grpc", lambda o: _named(o, "NetworkPolicy", "model-service")["spec"][
        "ingress"][0].update({"from": [{"podSelector": {}}]}))
    expect("reach model-service port grpc", lambda o: _named(o, "NetworkPolicy", "model-service")["spec"][
        "ingress"][0].pop("from"))
    expect("reach preproc port metrics", lambda o: _named(o, "NetworkPolicy", "preproc")["spec"][
        "ingress"][0].pop("ports"))
    expect("no NetworkPolicy restricts ingress to model-service",
           lambda o: o.remove(_named(o, "NetworkPolicy", "model-service")))
    expect("which no service exports", lambda o: _named(o, "ScaledObject", "model-service")["spec"]["triggers"][0][
        "metadata"].update(query="sum(splitserve_queue_lenght)"))
    expect("both a ScaledObject and a HorizontalPodAutoscaler", lambda o: o.append(_broken(
        [_named(o, "HorizontalPodAutoscaler", "preproc")], lambda h: h[0]["spec"]["scaleTargetRef"].update(
            name="model-service"))[0]))
    expect("which no Service it selects has", lambda o: _named(o, "ServiceMonitor", "model-service")["spec"][
        "endpoints"][0].update(port="http-metrics"))
    expect("port 8001, which does not exist", lambda o: _named(o, "GRPCRoute", "preproc")["spec"]["rules"][0][
        "backendRefs"][0].update(port=8001))


def test_custom_resources_are_checked_against_their_crds(rendered):
    objects = rendered["gpu-queue-scaling"]
    for kind, name in (("ScaledObject", "model-service"), ("ServiceMonitor", "preproc"),
                       ("GRPCRoute", "preproc"), ("Gateway", "splitserve")):
        assert vd.k8s_schema_problems(_named(objects, kind, name)) == []
    scaled = copy.deepcopy(_named(objects, "ScaledObject", "model-service"))
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")  # the HPA's spelling
    assert any("minReplicas" in p for p in vd.k8s_schema_problems(scaled))
    monitor = copy.deepcopy(_named(objects, "ServiceMonitor", "preproc"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"  # the CRD's duration pattern
    assert any("interval" in p for p in vd.k8s_schema_problems(monitor))
    route = copy.deepcopy(_named(objects, "GRPCRoute", "preproc"))
    route["spec"]["rules"][0]["matches"][0]["method"]["type"] = "Prefix"  # not an enum value
    assert any("Prefix" in p for p in vd.k8s_schema_problems(route))


def test_dashboard_queries_exported_metrics():
    path = vd.ROOT / "deploy" / "grafana" / "splitserve-dashboard.json"
    dashboard = vd.json.loads(path.read_text())
    problems: list[str] = []
    vd.check_dashboard(problems, path, dashboard)
    assert problems == []
    queried = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("splitserve_time_per_output_token_seconds_bucket", "splitserve_generation_sequences",
                   "splitserve_prompt_tokens_total", "splitserve_stage_duration_seconds_bucket",
                   "splitserve_queue_depth", "splitserve_requests_total"):
        assert metric in queried
    broken = copy.deepcopy(dashboard)
    broken["panels"][0]["targets"][0]["expr"] = "rate(splitserve_request_total[5m])"
    broken["panels"][1]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prod-prometheus"}
    problems = []
    vd.check_dashboard(problems, path, broken)
    assert any("splitserve_request_total, which no service exports" in p for p in problems)
    assert any("${datasource}" in p for p in problems)


def test_config_map_names_follow_kustomize(tmp_path):
    # Suffixes printed by `kubectl kustomize` (kustomize v5.5.0) for these literals.
    assert vd.config_map_hash({"A": "1"}) == "89g4tffbfk"
    assert vd.config_map_hash({"A": "1&<b>é"}) == "4hm5828hd9"
    # A settings change renames the ConfigMap in the pod templates, which rolls the pods.
    copy_root = tmp_path / "k8s"
    shutil.copytree(vd.K8S_OVERLAYS.parent, copy_root)
    before = vd.render_kustomization(copy_root / "overlays" / "cpu")
    settings = copy_root / "base" / "settings.env"
    settings.write_text(settings.read_text().replace("PREPROC_LOG_LEVEL=INFO", "PREPROC_LOG_LEVEL=DEBUG"))
    after = vd.render_kustomization(copy_root / "overlays" / "cpu")
    for name in ("preproc", "model-service"):
        old = _deployment(before, name)["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        new = _deployment(after, name)["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert old != new and new[0]["configMapRef"]["name"].startswith("splitserve-config-")


def test_kubernetes_schemas_reject_invalid_objects(rendered):
    deployment = copy.deepcopy(_deployment(rendered["cpu"], "preproc"))
    assert vd.k8s_schema_problems(deployment) == []
    deployment["spec"]["replicas"] = "two"
    assert any("replicas" in p for p in vd.k8s_schema_problems(deployment))
    typo = copy.deepcopy(_deployment(rendered["cpu"], "preproc"))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 8011}}
    assert vd.k8s_schema_problems(typo)  # strict: unknown fields are errors


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_renderer_matches_kubectl_kustomize(rendered):
    for overlay, objects in rendered.items():
        theirs = vd.kubectl_render(vd.K8S_OVERLAYS / overlay)
        assert {vd._identity(o): o for o in objects} == {vd._identity(o): o for o in theirs}


# ---------------------------------------------------------------- Dockerfiles

def test_dockerfiles_declare_user_healthcheck_and_entrypoint():
    problems: list[str] = []
    vd.check_dockerfiles(problems)
    assert problems == []
    assert vd.dockerfile_entrypoint(vd.DOCKERFILES["preproc_service"]) == ["python", "-m", "preproc_service"]
    instructions = vd.dockerfile_instructions(vd.DOCKERFILES["model_service"])
    assert ("ARG", "VARIANT=cuda") in instructions
    assert any(inst == "FROM" and rest == "base-${VARIANT}" for inst, rest in instructions)
