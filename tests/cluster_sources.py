"""Readers for the shipped cluster files (cluster/*), as the tests of their environment
(tests/test_cluster_env.py) and their Kubernetes manifests (tests/test_cluster_manifests.py)
see them: every YAML document, every pod template, every container's environment, the
launcher's node environment and the job runtime envs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# Every file shipped under cluster/: a file added there must be added here, and to what the
# tests check about it.
SHIPPED = {"Dockerfile", "Dockerfile.dockerignore", "aws-cluster.yaml", "kuberay-raycluster.yaml",
           "kuberay-rayjob.yaml", "kuberay-shared.yaml", "mlflow_basic_auth.ini",
           "runtime_env.local.yaml", "runtime_env.yaml"}
KUBE_FILES = ("kuberay-shared.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
RAY_KINDS = ("RayCluster", "RayJob")


def shipped_files() -> dict[str, Path]:
    found = {p.name: p for p in CLUSTER.iterdir() if p.is_file()}
    assert set(found) == SHIPPED, f"cluster/ holds {sorted(found)}, expected {sorted(SHIPPED)}"
    return found


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def all_kube_docs() -> list[tuple[str, dict]]:
    return [(name, d) for name in KUBE_FILES for d in docs(name)]


def ray_cluster_specs(name: str) -> list[dict]:
    out = []
    for d in docs(name):
        if d["kind"] == "RayCluster":
            out.append(d["spec"])
        elif d["kind"] == "RayJob":
            out.append(d["spec"]["rayClusterSpec"])
    return out


def ray_pod_templates() -> list[tuple[str, str, dict]]:
    """(file, group, pod template) of every Ray head and worker group shipped."""
    out = []
    for name in KUBE_FILES:
        for spec in ray_cluster_specs(name):
            out.append((name, "head", spec["headGroupSpec"]["template"]))
            out += [(name, g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def pod_templates() -> list[tuple[str, str, dict]]:
    """Every pod template shipped: the Ray groups' and the Deployments'."""
    out = ray_pod_templates()
    for name, d in all_kube_docs():
        if d["kind"] == "Deployment":
            out.append((name, d["metadata"]["name"], d["spec"]["template"]))
    return out


def container_env(container: dict) -> dict[str, str]:
    """A container's `env` as name -> value, a Secret key as "secret:<name>/<key>"."""
    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = f"secret:{ref['name']}/{ref['key']}"
    return out


def job_runtime_envs() -> dict[str, dict[str, Any]]:
    """Every runtime env a job is submitted with: the runtime_env*.yaml files and the RayJob's
    runtimeEnvYAML."""
    envs = {p.name: yaml.safe_load(p.read_text()) for p in sorted(CLUSTER.glob("runtime_env*.yaml"))}
    for d in docs("kuberay-rayjob.yaml"):
        if d["kind"] == "RayJob":
            envs[f"kuberay-rayjob.yaml:{d['metadata']['name']}"] = yaml.safe_load(d["spec"]["runtimeEnvYAML"])
    assert set(envs) >= {"runtime_env.yaml", "runtime_env.local.yaml",
                         "kuberay-rayjob.yaml:lethe-llama32-1b"}, sorted(envs)
    return envs


# ----------------------------------------------------------------------------- launcher


def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())


def launcher_docker_env() -> dict[str, str]:
    """`-e NAME=VALUE` of the launcher's docker run_options: every node's container env."""
    env = {}
    for option in launcher()["docker"]["run_options"]:
        parts = shlex.split(option)
        if parts[0] in ("-e", "--env"):
            name, _, value = parts[1].partition("=")
            env[name] = value
    return env


def launcher_bind_targets() -> list[str]:
    """The container paths of the launcher's `-v HOST:CONTAINER` binds."""
    out = []
    for option in launcher()["docker"]["run_options"]:
        parts = shlex.split(option)
        if parts[0] in ("-v", "--volume"):
            out.append(parts[1].split(":")[1])
    return out


def ray_start_env(key: str) -> dict[str, str]:
    """The variables a launcher `ray start` command sets for the node's Ray (and so for every
    job driver and worker on it): `NAME=value` words before `ray start`."""
    starts = [c for c in launcher()[key] if "ray start" in c]
    assert len(starts) == 1, f"{key}: {starts}"
    prefix = starts[0].split("ray start", 1)[0]
    return dict(re.findall(r"\b([A-Z_][A-Z0-9_]*)=(\S+)", prefix))


def dockerfile_env() -> dict[str, str]:
    """ENV NAME=value pairs of cluster/Dockerfile."""
    env = {}
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", line)))
    return env
