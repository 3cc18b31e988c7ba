"""The Kubernetes manifests in deploy/k8s, offline: every resource of both variants (bundle from a PVC, bundle from
object storage) validated against the Kubernetes JSON schemas that kubernetes-validate ships, in strict mode
(unknown fields fail), and checked against the real server: its routes, settings, image, metrics and drain."""
from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.main import routes
from server.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
VARIANTS = {"pvc": K8S, "object-storage": K8S / "object-storage"}
# Fixed versions whose schemas kubernetes-validate ships: the oldest cluster targeted and a recent one.
KUBERNETES_VERSIONS = ("1.30", "1.35")
NAME = "promptkd-server"


# --- rendering: the subset of kustomize these kustomizations use -------------------------------------------------

def _merge(base, patch):
    """Strategic merge as kustomize applies it to these patches: maps merge, null deletes a key, lists of named
    items (containers, initContainers, volumes, env) merge by name, other lists are replaced. (Kustomize merges
    volumeMounts and ports by other keys; no patch here touches them. test_rendering_matches_kubectl_kustomize
    compares the result with the real kustomize wherever kubectl is installed.)"""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(out.get(key, {} if isinstance(value, dict) else None), value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                    for i in base + patch):
        out = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(out) if old["name"] == item["name"]), None)
            if index is None:
                out.append(_merge({}, item))
            else:
                out[index] = _merge(out[index], item)
        return out
    return patch


def render(directory: Path) -> list[dict]:
    """The resources `kubectl apply -k directory` would send."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch_entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        targets = [r for r in resources if (r["kind"], r["metadata"]["name"]) ==
                   (patch["kind"], patch["metadata"]["name"])]
        assert len(targets) == 1, f"patch {patch_entry['path']} must match exactly one resource"
        resources[resources.index(targets[0])] = _merge(targets[0], patch)
    return resources


def by_kind(resources: list[dict], kind: str) -> dict:
    [found] = [r for r in resources if r["kind"] == kind]
    return found


def container(deployment: dict, name: str = "server") -> dict:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request) -> list[dict]:
    return render(VARIANTS[request.param])


@pytest.fixture(scope="module")
def deployment() -> dict:
    return by_kind(render(K8S), "Deployment")


def uvicorn_cli():
    """uvicorn's click command (the package's `uvicorn.main` attribute is the function, not the module)."""
    return importlib.import_module("uvicorn.main").main


def dockerfile() -> str:
    return (REPO / "docker" / "server.Dockerfile").read_text()


# --- schema validation ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validate():
    utils = pytest.importorskip("kubernetes_validate.utils",
                                reason="kubernetes-validate is not installed (pip install kubernetes-validate): "
                                       "the manifests cannot be checked against the Kubernetes schemas")

    def check(resource: dict, version: str) -> None:
        # Raises ValidationError on a bad field or type, SchemaNotFoundError for a kind it has no schema for.
        utils.validate(resource, version, strict=True)

    def valid(resource: dict, version: str) -> None:
        """check(), failing with the field and the reason instead of the whole schema."""
        try:
            check(resource, version)
            return
        except utils.ValidationError as err:
            reason = f"{'.'.join(map(str, err.path))}: {err.message[:300]}"
        except utils.SchemaNotFoundError as err:
            reason = err.message
        pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} is not valid Kubernetes {version}: "
                    f"{reason}", pytrace=False)

    return check, valid, utils


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(rendered, validate, version):
    _, valid, utils = validate
    # Its validate() silently falls back to an older shipped version; insist on the one named.
    assert version in {utils.major_minor(v) for v in utils.all_versions()}, (
        f"this kubernetes-validate ships no Kubernetes {version} schemas: update KUBERNETES_VERSIONS")
    assert {r["kind"] for r in rendered} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget"}
    for resource in rendered:
        valid(resource, version)


def test_the_validator_rejects_broken_manifests(deployment, validate):
    check, valid, utils = validate
    unknown_field = json.loads(json.dumps(deployment))
    container(unknown_field)["livenessProbes"] = container(unknown_field).pop("livenessProbe")  # a typo
    wrong_type = json.loads(json.dumps(deployment))
    container(wrong_type)["ports"][0]["containerPort"] = "eight thousand"
    misplaced = json.loads(json.dumps(deployment))
    misplaced["spec"]["template"]["spec"]["readOnlyRootFilesystem"] = True  # a container field on the pod
    for broken in (unknown_field, wrong_type, misplaced):
        with pytest.raises(utils.ValidationError):
            check(broken, KUBERNETES_VERSIONS[0])
    valid(deployment, KUBERNETES_VERSIONS[0])  # the unbroken copy passes


# --- the manifests against the real server --------------------------------------------------------------------

def test_kustomizations_list_every_file_and_only_existing_ones():
    for kustomization_file in K8S.rglob("kustomization.yaml"):
        directory = kustomization_file.parent
        kustomization = yaml.safe_load(kustomization_file.read_text())
        listed = set(kustomization.get("resources", [])) | {p["path"] for p in kustomization.get("patches", [])}
        for entry in listed:
            assert (directory / entry).exists(), f"{kustomization_file} lists {entry}, which does not exist"
        files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert files <= listed, f"{kustomization_file} leaves out {sorted(files - listed)}"
    yamls = {p.parent for p in K8S.rglob("*.yaml")}
    assert all((d / "kustomization.yaml").exists() for d in yamls)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: rendering compared only with "
                                                            "this file's own kustomize subset")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendering_matches_kubectl_kustomize(variant):
    out = subprocess.run(["kubectl", "kustomize", str(VARIANTS[variant])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    assert sorted(filter(None, yaml.safe_load_all(out.stdout)), key=key) == sorted(render(VARIANTS[variant]),
                                                                                 key=key)


def test_probes_hit_real_routes_on_the_container_port(rendered):
    get_routes = {r.path for r in routes.routes if "GET" in r.methods}
    server = container(by_kind(rendered, "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert '"--port", "8000"' in dockerfile()  # the image's CMD listens there
    assert "PROMPTKD_GRPC_HOST=0.0.0.0 PROMPTKD_GRPC_PORT=8001" in dockerfile()  # and its gRPC server there
    paths = {}
    for probe in ("startupProbe", "livenessProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] in get_routes
        assert ports.get(get["port"], get["port"]) == 8000
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz"}
    assert server["readinessProbe"]["grpc"] == {"port": 8001}  # grpc.health.v1, which follows /readyz
    service = {p["name"]: p for p in by_kind(rendered, "Service")["spec"]["ports"]}
    assert service["grpc"]["targetPort"] == "grpc" and service["grpc"]["appProtocol"] == "grpc"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "loading and checking a bundle takes time"
    annotations = by_kind(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == 8000 and annotations["prometheus.io/path"] in get_routes


def test_env_names_are_real_settings_or_uvicorn_options(rendered, tmp_path):
    uvicorn_options = {f"UVICORN_{p.name.upper()}" for p in uvicorn_cli().params}
    deployment = by_kind(rendered, "Deployment")
    env = env_of(container(deployment))
    for name in env:
        if name.startswith("PROMPTKD_"):
            assert name.removeprefix("PROMPTKD_").lower() in Settings.model_fields, f"{name} is no server setting"
        else:
            assert name in uvicorn_options, f"{name} is neither a PROMPTKD_ setting nor a uvicorn option"
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    assert env["PROMPTKD_MODEL_REPOSITORY"] in mounts and "PROMPTKD_BUNDLE" not in env
    assert mounts[env["PROMPTKD_MODEL_REPOSITORY"]]["readOnly"] is True
    state = mounts[env["PROMPTKD_ROLLOUT_STATE"]]  # rollout decisions: a writable volume of the pod's own
    assert not state.get("readOnly")
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == state["name"]]
    assert "emptyDir" in volume
    settings = {k.removeprefix("PROMPTKD_").lower(): v for k, v in env.items() if k.startswith("PROMPTKD_")}
    Settings(**settings | {"rollout_state": tmp_path})  # the folder must exist: it does in the pod, not here


def test_pod_is_hardened_for_the_images_user(rendered):
    uid = int(re.search(r"^USER (\d+)$", dockerfile(), re.M).group(1))
    pod = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod.get("initContainers", []):
        hardening = c["securityContext"]
        assert hardening["allowPrivilegeEscalation"] is False
        assert hardening["readOnlyRootFilesystem"] is True
        assert hardening["capabilities"]["drop"] == ["ALL"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']} needs {kind}"
    server = container(by_kind(rendered, "Deployment"))
    assert server["image"] == yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["server"]["image"]
    assert server["imagePullPolicy"] == "IfNotPresent"
    tmp_volume = next(m["name"] for m in server["volumeMounts"] if m["mountPath"] == "/tmp")
    [tmp] = [v for v in pod["volumes"] if v["name"] == tmp_volume]
    assert "emptyDir" in tmp  # the only writable place on the read-only root
    for volume in pod["volumes"]:
        assert len(set(volume) - {"name"}) == 1, f"volume {volume['name']} needs exactly one source"


def test_grace_period_outlasts_the_prestop_sleep_and_the_drain(deployment, monkeypatch):
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment)
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"
    sleep = int(command[1])
    env = env_of(server)
    # The value uvicorn really parses from the variable (its CLI reads UVICORN_* through click).
    monkeypatch.setenv("UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN", env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"])
    params = uvicorn_cli().make_context("uvicorn", ["server.main:app"]).params
    drain = params["timeout_graceful_shutdown"]
    request_timeout = float(env.get("PROMPTKD_REQUEST_TIMEOUT_S", Settings.model_fields["request_timeout_s"].default))
    assert drain > request_timeout, "a request waiting for the engine must finish before uvicorn gives up on it"
    assert pod["terminationGracePeriodSeconds"] > sleep + drain, "SIGKILL would cut the drain short"


def test_hpa_pdb_and_service_select_the_deployments_pods(rendered):
    deployment = by_kind(rendered, "Deployment")
    assert deployment["metadata"]["name"] == NAME
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = by_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    pdb = by_kind(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind(rendered, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert [(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]] == [(80, 8000), (8001, 8001)]


def test_hpa_comment_names_real_metrics():
    families = list(Metrics().registry.collect())
    exported = {f.name for f in families} | {f.name + "_total" for f in families if f.type == "counter"}
    named = set(re.findall(r"promptkd_\w+", (K8S / "base" / "hpa.yaml").read_text()))
    assert "promptkd_queue_depth" in named
    assert named <= exported, f"not exported by server/metrics.py: {sorted(named - exported)}"


def test_bundle_sources():
    pvc_variant = render(K8S)
    claim = by_kind(pvc_variant, "PersistentVolumeClaim")
    pod = by_kind(pvc_variant, "Deployment")["spec"]["template"]["spec"]
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}

    storage_variant = render(VARIANTS["object-storage"])
    assert not [r for r in storage_variant if r["kind"] == "PersistentVolumeClaim"]
    deployment = by_kind(storage_variant, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert set(models) == {"name", "emptyDir"}
    [fetch] = pod["initContainers"]
    # The init container writes the repository the server is told to serve, through the volume the server reads.
    assert fetch["command"][-1] == env_of(container(deployment))["PROMPTKD_MODEL_REPOSITORY"]
    assert [m["mountPath"] for m in fetch["volumeMounts"] if m["name"] == "models"] == ["/models"]
    assert not fetch["volumeMounts"][0].get("readOnly")
