"""cluster/: the launcher YAML passes Ray's own validation; the KubeRay manifests have the shape
KubeRay reads and name only entrypoints, configs and paths that exist."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from synfer_ray.config import PipelineConfig, ServeConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def test_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["head_node_type"] in config["available_node_types"]
    assert any("constraints.txt" in command for command in config["setup_commands"])
    broken = {**config, "max_workers": "two"}
    with pytest.raises(Exception, match="is not of type 'integer'"):
        validate_config(prepare_config(broken))


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert "rayStartParams" in group
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "synfer-ray-auth"
    for worker in spec["workerGroupSpecs"]:
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


def test_raycluster_manifest():
    raycluster = manifest("raycluster.yaml")
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(raycluster["spec"])


def test_rayjob_runs_an_entrypoint_and_config_that_exist():
    rayjob = manifest("rayjob.yaml")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    _check_cluster_spec(rayjob["spec"]["rayClusterSpec"])
    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[0] == "python" and (ROOT / command[1]).is_file()
    config = ROOT / command[command.index("--config") + 1]
    load_config(PipelineConfig, config)
    assert "working_dir" in yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


def test_rayservice_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema
    rayservice = manifest("rayservice.yaml")
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    _check_cluster_spec(rayservice["spec"]["rayClusterConfig"])
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    application = serve_config.applications[0]
    module, _, attribute = application.import_path.partition(":")
    assert hasattr(__import__(module, fromlist=[attribute]), attribute)
    build_config(ServeConfig, application.args)


def test_image_recipe_copies_paths_that_exist():
    recipe = (ROOT / "cluster" / "Dockerfile").read_text()
    copied = [p for line in recipe.splitlines() if line.startswith("COPY")
              for p in re.sub(r"--\S+", "", line).split()[1:-1]]
    assert copied and all((ROOT / p).exists() for p in copied)
    assert "FROM rayproject/ray:2.60.0" in recipe
