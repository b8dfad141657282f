"""The Kubernetes manifests (deploy/k8s), checked offline: every kustomization renders (here in Python, and with
`kubectl kustomize` where kubectl exists, which must agree), every core object validates against the Kubernetes
schema (kubernetes-validate, strict), the custom resources (ServiceMonitor, DestinationRule, ServingRuntime,
InferenceService) have the fields their controllers need, and the server's container runs the launcher with
arguments, ports, probes and volumes that agree with the image and the package."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import CHECKOUT

from flux_triton.contract.protocol import SEQUENCE_HEADER
from flux_triton.deploy.commands import health_parser, serve_parser

K8S = CHECKOUT / "deploy" / "k8s"
TARGETS = ["base", "overlays/cluster", "overlays/cluster-istio", "kserve"]
KUBERNETES_VERSION = "1.32"
CORE_GROUPS = ("v1", "apps/v1", "autoscaling/v2", "policy/v1", "batch/v1")
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images", "replicas"}
SERVED = "/opt/flux-triton/served"  # the image's default repository (Dockerfile)


# --- kustomize, the part of it these manifests use ---------------------------------------------------------------


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply_operation(document: dict, operation: dict) -> None:
    """One JSON6902 operation (add, replace, remove)."""
    *parents, last = _pointer(operation["path"])
    node = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    op = operation["op"]
    if isinstance(node, list):
        if op == "add":
            node.insert(len(node) if last == "-" else int(last), copy.deepcopy(operation["value"]))
        elif op == "replace":
            node[int(last)] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del node[int(last)]
        else:
            raise ValueError(f"JSON6902 op {op!r} is not supported here")
    elif op in ("add", "replace"):
        if op == "replace" and last not in node:
            raise KeyError(f"replace {operation['path']}: nothing there")
        node[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del node[last]
    else:
        raise ValueError(f"JSON6902 op {op!r} is not supported here")


def _containers(node):
    """Every container of a manifest, at any depth (pods, templates, runtimes, predictors)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _build(folder: Path, documents: list[dict]) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{folder}: kustomization fields this renderer does not know: {unknown}"
    documents = list(documents)
    for entry in kustomization.get("resources", []):
        path = folder / entry
        documents += _build(path, []) if path.is_dir() else _documents(path)
    for entry in kustomization.get("components", []):
        component = folder / entry
        assert yaml.safe_load((component / "kustomization.yaml").read_text())["kind"] == "Component"
        documents = _build(component, documents)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [d for d in documents if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert matched, f"{folder}: patch target {target} matches nothing"
        for document in matched:
            for operation in yaml.safe_load(patch["patch"]):
                _apply_operation(document, operation)
    for entry in kustomization.get("replicas", []):
        for document in documents:
            if document["metadata"]["name"] == entry["name"] and "replicas" in document.get("spec", {}):
                document["spec"]["replicas"] = entry["count"]
    for entry in kustomization.get("images", []):
        for container in _containers(documents):
            name = container["image"].split(":")[0]
            if name == entry["name"]:
                container["image"] = f"{entry.get('newName', name)}:{entry['newTag']}"
    return documents


def render(target: str) -> list[dict]:
    return _build(K8S / target, [])


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {target: render(target) for target in TARGETS}


def one(documents: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


# --- rendering and schemas --------------------------------------------------------------------------------------


def test_every_kustomization_is_rendered_and_kubectl_renders_it_the_same(rendered):
    assert {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")} >= set(TARGETS)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the Python rendering alone was checked")
    for target, documents in rendered.items():
        output = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
        assert output.returncode == 0, output.stderr
        by_key = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(output.stdout) if d}
        assert by_key == {(d["kind"], d["metadata"]["name"]): d for d in documents}, target


def _custom_resource_problems(document: dict) -> list[str]:
    """The fields the custom resources' controllers need (their CRD schemas are not available offline)."""
    spec, kind = document.get("spec") or {}, document["kind"]
    problems = [] if document.get("metadata", {}).get("name") else ["metadata.name"]
    if kind == "ServiceMonitor":
        if not spec.get("selector"):
            problems.append("spec.selector")
        if not spec.get("endpoints") or not all(e.get("port") for e in spec["endpoints"]):
            problems.append("spec.endpoints[].port")
    elif kind == "DestinationRule":
        if not spec.get("host"):
            problems.append("spec.host")
        hashing = spec.get("trafficPolicy", {}).get("loadBalancer", {}).get("consistentHash", {})
        if len(hashing) != 1:
            problems.append("spec.trafficPolicy.loadBalancer.consistentHash: exactly one hash key")
    elif kind == "ServingRuntime":
        if not spec.get("containers") or not all(c.get("name") and c.get("image") for c in spec["containers"]):
            problems.append("spec.containers[].name/image")
        if not all(f.get("name") for f in spec.get("supportedModelFormats", [None]) or [None]):
            problems.append("spec.supportedModelFormats[].name")
    elif kind == "InferenceService":
        model = spec.get("predictor", {}).get("model", {})
        if not model.get("modelFormat", {}).get("name"):
            problems.append("spec.predictor.model.modelFormat.name")
        if not re.match(r"^(pvc|s3|gs|https?|hf|oci)://", model.get("storageUri", "")):
            problems.append("spec.predictor.model.storageUri")
    else:
        problems.append(f"{document.get('apiVersion')}/{kind}: neither a core kind nor a known custom resource")
    return [f"{kind}/{document.get('metadata', {}).get('name')}: {p}" for p in problems]


def check(document: dict) -> None:
    """Validate one object: core kinds against the Kubernetes schema (strict), custom resources by their fields."""
    if document["apiVersion"] in CORE_GROUPS:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    else:
        problems = _custom_resource_problems(document)
        assert not problems, problems


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates(rendered, target):
    for document in rendered[target]:
        check(document)


def test_a_broken_manifest_fails(rendered):
    deployment = one(rendered["base"], "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    hpa = copy.deepcopy(one(rendered["overlays/cluster"], "HorizontalPodAutoscaler"))
    del hpa["spec"]["scaleTargetRef"]
    for broken in (typo, wrong_type, hpa):
        with pytest.raises(kubernetes_validate.ValidationError):
            check(broken)
    monitor = copy.deepcopy(one(rendered["overlays/cluster"], "ServiceMonitor"))
    del monitor["spec"]["selector"]
    isvc = copy.deepcopy(one(rendered["kserve"], "InferenceService"))
    isvc["spec"]["predictor"]["model"]["storageUri"] = "/models"
    for broken in (monitor, isvc, {**monitor, "kind": "ServiceMonitr"}):
        with pytest.raises(AssertionError):
            check(broken)


# --- the server's pods --------------------------------------------------------------------------------------------


def _image_env(name: str) -> str:
    return re.search(rf"{name}=(\S+)", (CHECKOUT / "Dockerfile").read_text()).group(1)


def _launcher(container: dict):
    args, extra = serve_parser().parse_known_args(container["args"])
    assert extra == [], f"{container['name']}: arguments serve does not know would go to tritonserver: {extra}"
    assert args.address == "0.0.0.0"
    return args


def _env(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _check_server_container(container: dict, volumes: dict[str, dict]) -> None:
    args = _launcher(container)
    assert not container["image"].startswith("flux-triton"), "kustomize did not set the image"
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    if ports:  # a KServe runtime declares none: KServe knows its ports
        assert sorted(ports.values()) == sorted([args.http_port, args.grpc_port, args.metrics_port])

    def port_of(probe: dict) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    for name in ("startupProbe", "readinessProbe"):
        probe = container[name]
        assert probe["httpGet"]["path"] == "/v2/health/ready" and port_of(probe) == args.http_port, name
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "model load and warm-up need time"
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:4] == ["python3", "-m", "flux_triton", "health"]
    assert health_parser().parse_args(command[4:]).url == f"127.0.0.1:{args.http_port}"
    assert container["livenessProbe"]["timeoutSeconds"] >= 120  # the probe's own request timeout (deploy/health.py)
    secret = _env(container)["FLUX_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "flux-triton-admin", "key": "key"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("target", ["base", "overlays/cluster"])
def test_the_deployment_runs_the_launcher_as_the_image_does(rendered, target):
    documents = rendered[target]
    deployment = one(documents, "Deployment", "flux-triton")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (server,) = pod["containers"]
    _check_server_container(server, volumes)
    mounts = {mount["mountPath"]: mount for mount in server["volumeMounts"]}
    models = mounts[_image_env("FLUX_MODEL_ROOT")]
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
    repository = str(_launcher(server).model_repository)
    if target == "base":
        assert repository == SERVED and "initContainers" not in pod
    else:  # flux_dit: the init container generates the repository the server then serves
        (init,) = pod["initContainers"]
        assert init["image"] == server["image"]
        generate, copy_model = (shlex.split(part) for part in init["args"][0].split("&&"))
        assert generate[:4] == ["python3", "-m", "flux_triton", "repo"]
        assert generate[generate.index("--output") + 1] == repository
        assert generate[generate.index("--engine") + 1].startswith(_image_env("FLUX_ENGINE_DIR") + "/")
        assert copy_model[-2:] == [
            f"{_image_env('FLUX_TRITON_HOME')}/model_repository/dit_transformer",
            repository + "/",
        ]
        init_mounts = {mount["mountPath"]: mount["name"] for mount in init["volumeMounts"]}
        assert init_mounts[repository] == mounts[repository]["name"]
        assert volumes[mounts[repository]["name"]] == {"name": mounts[repository]["name"], "emptyDir": {}}
        assert init_mounts[_image_env("FLUX_ENGINE_DIR")] == mounts[_image_env("FLUX_ENGINE_DIR")]["name"]
        assert deployment["spec"]["replicas"] == 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (d for d in documents if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        names = {port.get("name") for port in server["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= names
    headless = one(documents, "Service", "flux-triton-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert "metrics" not in {port["name"] for port in headless["spec"]["ports"]}  # scraped once, through the other
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(_launcher(server).metrics_port)


def test_autoscaling_scales_the_deployment_on_the_adapter_queue_metric(rendered):
    documents = rendered["overlays/cluster"]
    hpa = one(documents, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert one(documents, target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert re.search(rule["name"]["matches"], "nv_inference_queue_duration_us")
    query = rule["metricsQuery"]
    assert query.count("<<.LabelMatchers>>") == 2 and "nv_inference_request_success" in query.split("/", 1)[1]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    monitor = one(documents, "ServiceMonitor")
    service = one(documents, "Service", "flux-triton")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    scraped = [
        s for s in documents if s["kind"] == "Service" and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["flux-triton"]


def test_istio_hashes_the_header_every_step_of_a_generation_carries(rendered):
    documents = rendered["overlays/cluster-istio"]
    rule = one(documents, "DestinationRule")
    assert rule["spec"]["host"] == one(documents, "Service", "flux-triton")["metadata"]["name"]
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] == {"httpHeaderName": SEQUENCE_HEADER}
    assert not [d for d in rendered["overlays/cluster"] if d["kind"] == "DestinationRule"]


def test_the_inference_service_runs_the_launcher_on_kserve_ports(rendered):
    documents = rendered["kserve"]
    isvc = one(documents, "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    runtime = one(documents, "ServingRuntime", model["runtime"])
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    (container,) = runtime["spec"]["containers"]
    # KServe merges the predictor's container into the runtime's: the server container is their union.
    merged = {**container, **{k: v for k, v in model.items() if k not in ("modelFormat", "runtime", "storageUri")}}
    merged["env"] = container["env"] + model["env"]
    volumes = {volume["name"]: volume for volume in isvc["spec"]["predictor"]["volumes"]}
    _check_server_container(merged, volumes)
    args = _launcher(container)
    assert (args.http_port, args.grpc_port) == (8080, 9000)  # KServe's v2 ports
    assert str(args.model_repository) == SERVED
    assert _env(container)["FLUX_MODEL_ROOT"]["value"] == "/mnt/models" and model["storageUri"].startswith("pvc://")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")
