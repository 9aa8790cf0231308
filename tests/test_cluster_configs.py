"""Cluster files and job files are checked with the tools that will read them: Ray's own autoscaler
config preparation + schema validation (no cloud credentials needed), the KubeRay autoscaler's
translation of a RayCluster spec, and the project's job schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from llava_c_ray.config import load_job

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = ROOT / "cluster" / "kuberay"
JOB_FILES = sorted((ROOT / "jobs").glob("*.yaml"))
SHARED = (
    "/mnt/shared"  # where every cluster file mounts shared storage and the 7B jobs keep their files
)


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def docker_base_ray_version() -> str:
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "Dockerfile has no official Ray base image"
    return base.group(1)


def assert_our_image(image: str) -> None:
    """`<registry>/llava-c-ray:<project version>`, the tag the Dockerfile's build line gives."""
    build = re.search(r"docker build -t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert build, "Dockerfile header lost its build command"
    assert image.rsplit("/", 1)[-1] == build.group(1) == f"llava-c-ray:{project_version()}"


def test_every_cloud_has_a_launcher_config() -> None:
    assert [p.name for p in LAUNCHER_CONFIGS] == ["aws.yaml", "gcp.yaml"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = read_yaml(path)
    config = prepare_config(raw)  # what `ray up` does before talking to the cloud
    validate_config(config)

    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must not run training or evaluation"
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    gpu = workers[0]
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["CPU"] >= 64
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert config["max_workers"] >= gpu["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    assert_our_image(raw["docker"]["image"])
    # The launcher's defaults would pip-install a Ray nightly over the image's pinned Ray.
    assert raw["setup_commands"] == [] and raw["worker_setup_commands"] == []
    assert not any("ray-wheels" in c for c in config["head_setup_commands"])
    # Shared storage: mounted on the host before Docker starts, and passed into the container.
    assert any(f" {SHARED}" in c and "mount" in c for c in raw["initialization_commands"])
    assert f"--volume {SHARED}:{SHARED}" in raw["docker"]["run_options"]
    # The dashboard and its job API (run any code) listen on loopback; `ray dashboard` tunnels in.
    (head_start,) = [c for c in raw["head_start_ray_commands"] if "ray start --head" in c]
    assert re.findall(r"--dashboard-host[= ](\S+)", head_start) == ["127.0.0.1"]
    assert "0.0.0.0" not in path.read_text()


def kuberay_manifests() -> dict[str, Any]:
    return {p.name: read_yaml(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def cluster_specs() -> dict[str, dict[str, Any]]:
    docs = kuberay_manifests()
    return {
        "raycluster.yaml": docs["raycluster.yaml"]["spec"],
        "rayjob.yaml": docs["rayjob.yaml"]["spec"]["rayClusterSpec"],
    }


def test_kuberay_manifests_have_the_right_kinds() -> None:
    docs = kuberay_manifests()
    assert {name: (d["apiVersion"], d["kind"]) for name, d in docs.items()} == {
        "raycluster.yaml": ("ray.io/v1", "RayCluster"),
        "rayjob.yaml": ("ray.io/v1", "RayJob"),
        "shared-pvc.yaml": ("v1", "PersistentVolumeClaim"),
    }
    assert docs["shared-pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_spec_passes_the_kuberay_autoscaler(name: str) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    spec = cluster_specs()[name]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == docker_base_ray_version()
    # The translation the autoscaler in the head pod runs on the custom resource; it validates too.
    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "llava-c", "namespace": "default"}, "spec": spec}
    )
    nodes = config["available_node_types"]
    assert nodes["headgroup"]["resources"]["CPU"] == 0
    gpu = nodes["gpu-8x"]
    assert gpu["resources"]["GPU"] == 8 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 1

    claim = read_yaml(KUBERAY / "shared-pvc.yaml")["metadata"]["name"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert_our_image(container["image"])
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim


def dashboard_host(spec: dict[str, Any]) -> str:
    return spec["headGroupSpec"]["rayStartParams"]["dashboard-host"]


def test_kuberay_dashboard_listens_on_loopback_where_it_can() -> None:
    """The RayCluster's dashboard is reached by port-forward; the RayJob's must listen on the pod
    network, because the KubeRay operator submits and polls the job through the head Service."""
    specs = cluster_specs()
    assert dashboard_host(specs["raycluster.yaml"]) == "127.0.0.1"
    assert dashboard_host(specs["rayjob.yaml"]) == "0.0.0.0"
    assert "token auth" in (KUBERAY / "rayjob.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in (ROOT / "cluster" / "README.md").read_text()


def test_kuberay_specs_agree_and_the_rayjob_runs_a_job_file_that_exists() -> None:
    specs = cluster_specs()
    for spec in specs.values():
        spec["headGroupSpec"]["rayStartParams"].pop("dashboard-host")
    assert specs["raycluster.yaml"] == specs["rayjob.yaml"], "rayjob.yaml's cluster drifted"
    entrypoint = read_yaml(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    match = re.fullmatch(r"llava-c run /home/ray/llava-c-ray/(jobs/[\w.-]+\.yaml)", entrypoint)
    assert match, entrypoint
    assert (ROOT / match.group(1)).is_file()
    # The image copies jobs/ to its working directory, where the entrypoint looks for it.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert (
        "WORKDIR /home/ray/llava-c-ray" in dockerfile
        and "COPY --chown=ray:users jobs" in dockerfile
    )


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_passes_the_project_schema(path: Path, tiny_benchmark: Path) -> None:
    # Cluster paths do not exist here (check_files=False); a benchmark-based job gets a real one.
    overrides = [f"benchmark.path={tiny_benchmark}"] if "benchmark" in read_yaml(path) else []
    job = load_job(path, overrides, check_files=False)
    assert job.name == path.stem
    if job.cluster.use_gpu:
        assert job.storage.path.startswith(f"{SHARED}/")
        assert job.model.path.startswith(f"{SHARED}/")
        assert all(str(t.train).startswith(f"{SHARED}/") for t in job.tasks)


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_starts_with_the_command_that_launches_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: line 1 must be a comment with the launch command"
    run = re.search(r"llava-c run (jobs/\S+\.yaml)", first)
    if run:
        assert run.group(1) == f"jobs/{path.name}", "the command must launch this file"
    else:
        assert "llava-c demo" in first, first


def test_paper_settings_use_the_papers_recipe() -> None:
    """SPEC.md §2.3-2.4: LoRA 128/256, lr 2e-5, cosine, warmup 0.03, 1 epoch, batch 128, bf16, α 0.2."""
    finetune = load_job(ROOT / "jobs/continual_finetune_llava15_7b.yaml", check_files=False)
    pretrain = load_job(ROOT / "jobs/continual_pretrain_llava15_7b.yaml", check_files=False)
    search = load_job(ROOT / "jobs/alpha_search_7b.yaml", check_files=False)
    assert [t.name for t in finetune.tasks] == [
        "iconqa",
        "superclevr",
        "clevrmath",
        "figureqa",
        "arxivqa",
    ]
    assert [t.name for t in pretrain.tasks] == ["tqa", "coco", "ocrvqa", "textvqa", "gqa", "vg"]
    for job, stage in [(finetune, 3), (pretrain, 2), (search, 3)]:
        t = job.training
        assert (t.lora_r, t.lora_alpha, t.lr, t.weight_decay) == (128, 256, 2e-5, 0.0)
        assert (t.schedule, t.warmup_ratio, t.epochs, t.global_batch) == ("cosine", 0.03, 1, 128)
        assert (t.precision, t.strategy, t.zero_stage) == ("bf16", "deepspeed", stage)
        assert job.cluster.num_workers == 8 and job.cluster.use_gpu
        assert job.method.name == "llava_c" and job.consolidation.alpha == 0.2
    assert search.search.enabled and not finetune.search.enabled
    assert [t.model_dump() for t in search.tasks] == [t.model_dump() for t in finetune.tasks]
