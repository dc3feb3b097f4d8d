"""Deployment files: the Dockerfile linted with hadolint, the Kubernetes manifests validated with
kubernetes-validate (strict), and both kept in step with the code they name."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    binary = BIN / tool
    if not binary.exists():
        pytest.fail(f"{tool} is not installed: run `make setup`")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, cwd=ROOT)


def test_dockerfile_lints_clean_and_uses_the_pinned_triton():
    done = run("hadolint", "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in text  # Triton 2.51, as tritonclient==2.51.0
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text


def test_kubernetes_manifests_validate():
    manifests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    done = run("kubernetes-validate", "--strict", *manifests)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(manifests)


def test_autoscaling_metric_is_one_the_engine_exports():
    source = (ROOT / "src" / "pagedllm" / "serving" / "metrics.py").read_text()
    hpa = (ROOT / "deploy" / "k8s" / "hpa.yaml").read_text()
    name = re.search(r"name: (pagedllm_\w+)", hpa).group(1)
    assert f'"{name}"' in source
    assert "/v2/models/llm/ready" in (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()
