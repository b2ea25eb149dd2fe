"""The deployment files: Kubernetes manifests that probe /health, cache
models on a volume and bound memory; the CPU image answers /health."""

import os
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.server_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,gpu", [("kubernetes.yaml", False), ("kubernetes-gpu.yaml", True)])
def test_manifests_probe_health_cache_models_and_bound_memory(name, gpu):
    with open(os.path.join(ROOT, "deploy", name)) as f:
        deployment, service = yaml.safe_load_all(f)
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["model-cache"] == "/var/cache/tokenmill"  # TOKENMILL_CACHE of the images
    assert "model-cache" in {v["name"] for v in pod["volumes"]}
    limits = container["resources"]["limits"]
    assert limits["memory"]
    assert ("nvidia.com/gpu" in limits) == gpu
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert (
        service["spec"]["selector"]
        == labels
        == deployment["spec"]["template"]["metadata"]["labels"]
    )


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not docker_works(), reason="docker is not installed or its daemon is not running"
)
def test_cpu_image_answers_health():
    tag = "tokenmill:cpu-test"
    build = subprocess.run(
        ["docker", "build", "-f", "deploy/Dockerfile.cpu", "-t", tag, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    port = free_port()
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "-p", f"{port}:8000", "-m", "4g", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        pytest.fail("the container did not answer /health within 300 s")
    finally:
        subprocess.run(["docker", "kill", container], capture_output=True)


def test_the_grafana_dashboard_reads_metrics_the_server_exports():
    import json
    import re

    from tokenmill.entrypoints.metrics import EngineMetrics

    exported = set()
    for family in EngineMetrics("m").registry.collect():
        exported |= {sample.name for sample in family.samples}
    with open(os.path.join(ROOT, "deploy", "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"tokenmill:\w+", e)}
    assert len(used) >= 10
    assert used <= exported, used - exported
