"""infra/: the compose file and the Kubernetes GPU work-pool template are wired consistently.

Docker is not available here, so this checks what `docker compose config` would plus the wiring:
services, loopback-only ports, no hard-coded secrets, every URL pointing at a service and port that
exist, and that the work-pool template renders to a Job requesting ``nvidia.com/gpu``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _ports(svc: dict) -> dict[int, int]:
    out = {}
    for p in svc.get("ports", []):
        host_ip, host, container = str(p).split(":")
        assert host_ip == "127.0.0.1", f"port {p} must bind loopback only"
        out[int(container)] = int(host)
    return out


def _container_port(svc: dict) -> set[int]:
    ports = set(_ports(svc))
    cmd = svc.get("command", "")
    ports |= {int(m) for m in re.findall(r"--port (\d+)", cmd if isinstance(cmd, str) else "")}
    return ports


def test_services_and_dependencies(compose):
    svcs = compose["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(svcs)
    for name, svc in svcs.items():
        for dep in svc.get("depends_on", {}):
            assert dep in svcs, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith("."):
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"
            else:
                assert (INFRA / src).exists(), f"{name}: missing file {src}"
        if "build" in svc:
            assert (INFRA / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()


def test_urls_point_at_services_and_ports(compose):
    svcs = compose["services"]
    text = VAR.sub("x", (INFRA / "compose.yaml").read_text())  # variables substituted
    urls = re.findall(r"(?:https?|postgresql(?:\+asyncpg)?)://[^\s'\"]+", text)
    assert len(urls) >= 6
    for url in urls:
        u = urlparse(url)
        if u.hostname in ("127.0.0.1", "localhost"):
            continue
        assert u.hostname in svcs, f"{url}: no service {u.hostname}"
        assert u.port in _container_port(svcs[u.hostname]) or (
            u.hostname == "minio" and u.port == 9000
        ), f"{url}: {u.hostname} does not listen on {u.port}"

    prefect_db = svcs["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = svcs["mlflow"]["command"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination s3://" in mlflow_cmd
    assert svcs["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    init = (INFRA / "postgres-init.sql").read_text()
    assert "CREATE DATABASE prefect" in init and "CREATE DATABASE mlflow" in init

    w = svcs["worker"]["environment"]
    assert w["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert w["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert w["MERGEFLOW_S3_ENDPOINT"] == "http://minio:9000"
    assert "--pool gpu" in svcs["worker"]["command"]
    # the bucket the worker pushes to is one the init job creates
    assert w["MERGEFLOW_S3_BUCKET"] == svcs["minio-buckets"]["environment"]["DVC_BUCKET"]


def test_no_hard_coded_secrets_and_every_variable_documented(compose):
    text = (INFRA / "compose.yaml").read_text()
    for svc in compose["services"].values():
        for k, v in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", k):
                assert VAR.fullmatch(str(v)), f"{k} must come from the environment, not the file"
    used = set(VAR.findall(text))
    example = (INFRA / "env.example").read_text()
    readme = (INFRA / "README.md").read_text()
    for var in used:
        assert var in example and var in readme, f"{var} not in infra/env.example and README"


def test_gpu_work_pool_template_renders_a_gpu_job():
    from prefect.utilities.templating import apply_values

    tpl = json.loads((INFRA / "k8s" / "gpu-work-pool.json").read_text())
    props = tpl["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(tpl["job_configuration"])))
    assert placeholders <= set(props), placeholders - set(props)
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="retrain-1", command="prefect flow-run execute", env={}, labels={})
    job = apply_values(tpl["job_configuration"], values)["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    values = yaml.safe_load((INFRA / "k8s" / "worker-values.yaml").read_text())
    assert values["worker"]["config"] == {"workPool": "gpu", "type": "kubernetes"}
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "mergeflow.yaml").read_text()))
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ConfigMap", "mergeflow-endpoints") in names
    assert ("PersistentVolumeClaim", values_claim(tpl)) in names


def values_claim(tpl: dict) -> str:
    return tpl["variables"]["properties"]["workspace_claim"]["default"]
