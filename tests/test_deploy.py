"""Deployment files: the Dockerfile linted with hadolint, the Kubernetes manifests validated with
kubernetes-validate (strict), and both kept in step with the code they name."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

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
    # 25.07: the first with the fixes of CVE-2025-23319/23320/23334 and 23310/23311 (the v2 protocol of our
    # tritonclient==2.51.0 pin is the same)
    assert "FROM nvcr.io/nvidia/tritonserver:25.07-py3" in text
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert re.search(r"^USER 10001$", text, re.M) and "PAGEDLLM_ADMIN_KEY=" not in text.split("CMD")[-1]


def test_tritonserver_pods_run_pagedllm_serve_and_only_the_gateway_reaches_them():
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["pagedllm", "serve"] and not any("admin-key" in a for a in args)  # the key: env only
    usage = subprocess.run([sys.executable, "-m", "pagedllm.cli", "serve", "--help"], capture_output=True,
                           text=True, cwd=ROOT).stdout
    for flag in args[2:]:
        assert flag.split("=")[0] in usage, flag
    policy = yaml.safe_load((ROOT / "deploy" / "k8s" / "networkpolicy.yaml").read_text())
    inference, openai, metrics = policy["spec"]["ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "pagedllm"}
    assert inference["from"] == [{"podSelector": {"matchLabels": {"app": "pagedllm-gateway"}}}]
    assert {p["port"] for p in inference["ports"]} == {8000, 8001} and "from" not in metrics
    assert [p["port"] for p in openai["ports"]] == [9000] and len(openai["from"]) == 2


def test_kubernetes_manifests_validate():
    manifests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    done = run("kubernetes-validate", "--strict", *manifests)
    assert done.returncode == 0, done.stdout + done.stderr
    resources = sum(1 for m in manifests for doc in yaml.safe_load_all((ROOT / m).read_text()) if doc)
    assert done.stdout.count("passed") == resources


def test_the_inference_pool_validates_against_its_pinned_crd_and_selects_the_pods_openai_port():
    import jsonschema
    folder = ROOT / "deploy" / "k8s" / "inference-extension"
    crd = yaml.safe_load((folder / "crd" / "inferencepools.inference.networking.k8s.io.yaml").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    pool = yaml.safe_load((folder / "inferencepool.yaml").read_text())
    assert (pool["apiVersion"], pool["kind"]) == (f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"])
    jsonschema.validate(pool, schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema is really applied
        jsonschema.validate({**pool, "spec": {**pool["spec"], "targetPorts": []}}, schema)
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port = pool["spec"]["targetPorts"][0]["number"]
    server = pod["spec"]["containers"][0]
    assert f"--openai-port={port}" in server["args"] and port in [p["containerPort"] for p in server["ports"]]
    done = run("kubernetes-validate", "--strict", str((folder / "epp.yaml").relative_to(ROOT)))
    assert done.returncode == 0, done.stdout + done.stderr
    epp = [d for d in yaml.safe_load_all((folder / "epp.yaml").read_text()) if d]
    service = next(d for d in epp if d["kind"] == "Service")
    assert service["metadata"]["name"] == pool["spec"]["endpointPickerRef"]["name"]
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]
    config = yaml.safe_load(next(d for d in epp if d["kind"] == "ConfigMap")["data"]["default-plugins.yaml"])
    plugins = {p["type"] for p in config["plugins"]}
    assert "prefix-cache-scorer" in plugins
    assert {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]} <= plugins


def test_autoscaling_metric_is_one_the_engine_exports():
    source = (ROOT / "src" / "pagedllm" / "serving" / "metrics.py").read_text()
    hpa = (ROOT / "deploy" / "k8s" / "hpa.yaml").read_text()
    name = re.search(r"name: (pagedllm_\w+)", hpa).group(1)
    assert f'"{name}"' in source
    assert "/v2/models/llm/ready" in (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()


def test_the_gateway_deployment_passes_flags_the_gateway_takes():
    manifest = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()) if d]
    args = manifest[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["pagedllm", "gateway"]
    usage = subprocess.run([sys.executable, "-m", "pagedllm.cli", "gateway", "--help"], capture_output=True,
                           text=True, cwd=ROOT).stdout
    for flag in args[2:]:
        assert flag.split("=")[0] in usage, flag
    headless = next(d for d in manifest if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    assert f"--triton-dns={headless['metadata']['name']}:8001" in args


def test_the_gateway_installs_and_ships_without_the_engine():
    """`pip install "pagedllm[gateway,routing]" ./client` and the gateway image carry no torch (importing the
    gateway loads none either: tests/gateway/test_server.py); routing brings transformers, for tokenizers only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = project["dependencies"] + extras["gateway"] + extras["routing"] + client["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in needed}
    assert not names & {"torch", "xgrammar", "safetensors", "pagedllm"}, names
    assert "torch" in str(extras["engine"]) and "transformers" not in str(extras["gateway"])
    stage = (ROOT / "Dockerfile").read_text().split(" AS gateway\n")[1].split("\nFROM ")[0]
    assert 'pip install ".[gateway,routing]" ./client' in stage and "torch" not in stage and "USER 10001" in stage
    manifest = next(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()))
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "pagedllm-gateway:latest"


def debian_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is missing: install Debian's {package} package (`make setup` does, as root)")
    return path


def test_alert_rules_check_and_each_alert_fires_and_stays_quiet():
    promtool = debian_tool("promtool", "prometheus")
    folder = ROOT / "deploy" / "prometheus"
    checked = subprocess.run([promtool, "check", "rules", "alerts.yaml"], capture_output=True, text=True, cwd=folder)
    assert checked.returncode == 0 and "SUCCESS: 7 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True,
                            cwd=folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"alert: (\w+)", (folder / "alerts.yaml").read_text()))
    proved = set(re.findall(r"alertname: (\w+)", (folder / "alerts_test.yaml").read_text()))
    assert alerts == proved and len(alerts) == 7
