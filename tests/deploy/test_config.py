"""Offline validation of the deployment files: docker-compose (Debian's docker-compose),
Kustomize overlays (`kubectl kustomize`) and their core resources (kubernetes-validate), the
KubeRay RayCluster's structure, images and ports agreeing across compose, Kubernetes and the
Dockerfile, the Prometheus config (promtool) and the Grafana dashboard. Tools that are missing
skip with the reason; deploy/check.sh installs them."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import _stack
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
IMAGE = "ghcr.io/secant/secant:0.1.0"
GPU_IMAGE = "ghcr.io/secant/secant:0.1.0-cuda"
GRPC_PORT, METRICS_PORT = 50051, 9464
RAY_PORTS = {"gcs-server": 6379, "client": 10001, "dashboard": 8265, "metrics": 8080}
K8S_VERSION = "1.33.0"  # gRPC probes are GA since 1.27; any current cluster


def need(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if not path:
        pytest.skip(f"{tool} is not installed (deploy/check.sh installs it)")
    return path


def compose() -> dict:
    return _stack.compose()


# --- docker-compose -----------------------------------------------------------------------
@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_accepts_the_file(profile):
    argv = [need("docker-compose"), "-f", str(ROOT / "docker-compose.yml")]
    if profile:
        argv += ["--profile", profile]
    result = subprocess.run(argv + ["config", "-q"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_compose_stack_shape():
    services = compose()["services"]
    assert {"gateway", "ray-head", "ray-worker", "ray-gpu-worker", "prometheus",
            "grafana"} <= set(services)
    # Scalable: no fixed container name, no published port on the CPU worker.
    assert "container_name" not in services["ray-worker"] and "ports" not in services["ray-worker"]
    gpu = services["ray-gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--num-gpus=1" in shlex.split(gpu["command"])
    gateway = services["gateway"]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in gateway["volumes"]}
    assert volumes == {"secant-data": "/var/lib/secant",
                       "secant-artifacts": "/var/lib/secant/artifacts"}
    assert {"secant-data", "secant-artifacts"} <= set(compose()["volumes"])
    # The token is a file secret, read by every Ray process through RAY_AUTH_TOKEN_PATH.
    for name in ("gateway", "ray-head", "ray-worker", "ray-gpu-worker"):
        service = services[name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert "ray_auth_token" in service["secrets"], name
        assert "RAY_AUTH_TOKEN" not in service["environment"], name
    assert compose()["secrets"]["ray_auth_token"]["file"] == "./deploy/secrets/ray_auth_token"
    # Published ports stay on the host's loopback (the gateway has no caller auth yet).
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # The health check is `secant health` against the gRPC health service.
    assert gateway["healthcheck"]["test"][1:3] == ["secant", "health"]
    prometheus = services["prometheus"]
    assert prometheus["network_mode"] == "service:gateway"
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    grafana_volumes = " ".join(services["grafana"]["volumes"])
    assert "./deploy/grafana/provisioning:" in grafana_volumes
    assert "./deploy/grafana/dashboards:" in grafana_volumes


# --- Kubernetes ----------------------------------------------------------------------------
_rendered: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        kubectl = need("kubectl")
        result = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        _rendered[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[overlay]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_and_core_resources_validate(overlay):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (deploy/check.sh)")
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                            "PodDisruptionBudget", "PodDisruptionBudget", "NetworkPolicy",
                            "NetworkPolicy", "ServiceMonitor", "PodMonitor", "RayCluster"])
    assert {d["metadata"].get("namespace") for d in docs} == {"secant"}
    custom = {"RayCluster", "ServiceMonitor", "PodMonitor"}
    for doc in docs:
        if doc["kind"] in custom:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The RayCluster's pod templates are core PodTemplateSpecs: validate them as Pods.
    cluster = by_kind(docs, "RayCluster")[0]["spec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "ray-template", **template.get("metadata", {})},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_raycluster_structure(overlay):
    cluster = by_kind(rendered(overlay), "RayCluster")[0]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert params["port"] == str(RAY_PORTS["gcs-server"])
    assert params["ray-client-server-port"] == str(RAY_PORTS["client"])
    assert params["dashboard-port"] == str(RAY_PORTS["dashboard"])
    assert params["metrics-export-port"] == str(RAY_PORTS["metrics"])
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == IMAGE
    assert {p["name"]: p["containerPort"] for p in head_container["ports"]} == RAY_PORTS
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == ({"cpu", "gpu"} if overlay == "gpu" else {"cpu"})
    for name, group in groups.items():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] > group["minReplicas"], f"{name}: nothing to autoscale"
        assert group["rayStartParams"]["metrics-export-port"] == str(RAY_PORTS["metrics"])
        container = group["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": RAY_PORTS["metrics"]}, name
        resources = container["resources"]
        assert resources["limits"]["cpu"] == resources["requests"]["cpu"], name
        if name == "gpu":
            assert container["image"] == GPU_IMAGE
            assert resources["limits"]["nvidia.com/gpu"] == 1
            assert group["rayStartParams"]["num-gpus"] == "1"
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        else:
            assert container["image"] == IMAGE
            assert "nvidia.com/gpu" not in resources.get("limits", {})
    # Every Ray container (and the autoscaler) uses token auth from the Secret.
    containers = [head_container] + [g["template"]["spec"]["containers"][0]
                                     for g in groups.values()]
    for container in [*containers, spec["autoscalerOptions"]]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "secant-auth", "key": "ray-auth-token"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_manifests(overlay):
    docs = rendered(overlay)
    deployment = by_kind(docs, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    service = by_kind(docs, "Service")[0]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    # The gateway joins KubeRay's head Service through --ray-address.
    cluster = by_kind(docs, "RayCluster")[0]
    config = by_kind(docs, "ConfigMap")[0]["data"]
    assert config["SECANT_RAY_ADDRESS"] == (
        f"{cluster['metadata']['name']}-head-svc:{RAY_PORTS['gcs-server']}")
    assert "--ray-address=$(SECANT_RAY_ADDRESS)" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "secant-auth"
    # NetworkPolicy: Ray pods take traffic from this namespace only (+ metrics scrapes).
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    ray_policy = policies["secant-ray-internal"]["spec"]
    ray_cluster_label = {"ray.io/cluster": cluster["metadata"]["name"]}
    assert ray_policy["podSelector"]["matchLabels"] == ray_cluster_label
    for rule in ray_policy["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if "namespaceSelector" in peer:
                assert [p["port"] for p in rule["ports"]] == [RAY_PORTS["metrics"]]
            else:
                assert peer == {"podSelector": {}}
    pdbs = {p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs == {"secant-gateway", "secant-ray-head"}


def test_k8s_gateway_args_parse_with_secant_serve():
    """The k8s args and the compose command are accepted by the real `secant serve` parser."""
    from service.cli import _serve_parser

    parser = _serve_parser()
    deployment = by_kind(rendered("cpu"), "Deployment")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [a.replace("$(SECANT_RAY_ADDRESS)", "secant-ray-head-svc:6379")
             .replace("$(SECANT_LOG_LEVEL)", "info").replace("$(SECANT_MAX_CONCURRENT_JOBS)", "64")
            for a in container["args"]]
    assert args[:2] == ["secant", "serve"]
    compose_args = _stack._command(compose()["services"]["gateway"])
    assert compose_args[:2] == ["secant", "serve"]
    parsed = parser.parse_args(compose_args[2:])
    assert (parsed.port, parsed.metrics_port, parsed.ray_address) == (
        GRPC_PORT, METRICS_PORT, "ray-head:6379")
    known = {o for action in parser._actions for o in action.option_strings}
    if "--metrics-host" not in known:
        pytest.skip("service/cli.py has no --metrics-host yet (the k8s gateway needs /metrics on "
                    "the pod IP for the ServiceMonitor); see deploy/README.md")
    parsed = parser.parse_args(args[2:])
    assert (parsed.port, parsed.metrics_port) == (GRPC_PORT, METRICS_PORT)


# --- images and ports across compose, k8s, Dockerfile ----------------------------------------
def test_images_and_ports_agree_across_compose_k8s_and_dockerfile():
    services = compose()["services"]
    assert {services[s]["image"] for s in ("gateway", "ray-head", "ray-worker")} == {IMAGE}
    assert services["ray-gpu-worker"]["image"] == GPU_IMAGE
    assert services["ray-gpu-worker"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert services["ray-head"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    k8s_images = set()
    for doc in rendered("gpu"):
        k8s_images |= set(re.findall(r"'image': '([^']+)'", str(doc)))
    assert k8s_images == {IMAGE, GPU_IMAGE}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {IMAGE} " in dockerfile and f"-t {GPU_IMAGE} " in dockerfile
    exposed = {int(p) for line in dockerfile.splitlines() if line.startswith("EXPOSE")
               for p in line.split()[1:]}
    assert {GRPC_PORT, METRICS_PORT, *RAY_PORTS.values()} <= exposed
    head = shlex.split(services["ray-head"]["command"])
    assert f"--port={RAY_PORTS['gcs-server']}" in head
    assert f"--ray-client-server-port={RAY_PORTS['client']}" in head
    assert f"--dashboard-port={RAY_PORTS['dashboard']}" in head
    assert f"--metrics-export-port={RAY_PORTS['metrics']}" in head
    assert "--num-cpus=0" in head
    for name in ("ray-worker", "ray-gpu-worker"):
        worker = shlex.split(services[name]["command"])
        assert f"--address=ray-head:{RAY_PORTS['gcs-server']}" in worker
        assert f"--metrics-export-port={RAY_PORTS['metrics']}" in worker
    gateway = _stack._command(services["gateway"])
    assert gateway[gateway.index("--port") + 1] == str(GRPC_PORT)
    assert gateway[gateway.index("--metrics-port") + 1] == str(METRICS_PORT)
    assert f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}" in services["gateway"]["ports"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {f"127.0.0.1:{METRICS_PORT}", f"ray-head:{RAY_PORTS['metrics']}"} <= targets
    dns = [c for job in prometheus["scrape_configs"] for c in job.get("dns_sd_configs", [])]
    assert dns and all(c["port"] == RAY_PORTS["metrics"] for c in dns)


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert 'https://download.pytorch.org/whl/${TORCH_VARIANT}' in text
    assert '"torch==${TORCH_VERSION}"' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject, "Dockerfile's TORCH_VERSION must match pyproject"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("root", "0:", "0")), user
    healthcheck = [line for line in text.splitlines() if line.strip().startswith("CMD [\"secant\"")]
    assert healthcheck and '"health"' in healthcheck[0]
    assert (DEPLOY / "entrypoint.sh").exists()
    for source in re.findall(r"^COPY (\S+)", text, re.M):
        if not source.startswith("--"):
            assert (ROOT / source.rstrip("/")).exists(), f"COPY {source}: missing"


def test_entrypoint_is_valid_shell():
    result = subprocess.run(["sh", "-n", str(DEPLOY / "entrypoint.sh")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


# --- Prometheus and Grafana ----------------------------------------------------------------
def test_promtool_accepts_prometheus_yml():
    result = subprocess.run([need("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_and_provisioning():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "secant.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = _stack.dashboard_exprs(dashboard)
    assert len(exprs) >= len(panels)
    metrics = _stack.dashboard_metrics(dashboard)
    for wanted in ("secant_jobs_finished_total", "secant_jobs_submitted_total",
                   "secant_solve_duration_seconds_bucket", "secant_rpc_requests_total",
                   "secant_running_jobs", "ray_resources"):
        assert wanted in metrics, wanted
    assert any("histogram_quantile(0.99" in e for e in exprs)
    assert any("histogram_quantile(0.5" in e for e in exprs)
    assert all(m.startswith(("secant_", "ray_")) for m in metrics), metrics
    # Ray's metrics: names Ray's own Grafana dashboards (shipped with ray) query.
    import ray.dashboard.modules.metrics.dashboards as ray_dashboards

    ray_text = "".join(p.read_text() for p in Path(ray_dashboards.__file__).parent.glob("*.py"))
    for metric in sorted(m for m in metrics if m.startswith("ray_")):
        assert metric in ray_text, f"{metric}: not a metric Ray's dashboards know"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://gateway:9090"
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "secant.yml").read_text())
    mounted = [v for v in compose()["services"]["grafana"]["volumes"]
               if v.startswith("./deploy/grafana/dashboards:")][0].split(":")[1]
    assert provider["providers"][0]["options"]["path"] == mounted


# --- secant health -------------------------------------------------------------------------
def test_health_cli_reports_an_unreachable_gateway():
    from service import health_cli

    port = _stack.free_port()  # nothing listens there
    assert health_cli.main(["--address", f"127.0.0.1:{port}", "--timeout", "0.5", "-q"]) == 1
    assert health_cli.main(["health", "--bogus"]) == 2
