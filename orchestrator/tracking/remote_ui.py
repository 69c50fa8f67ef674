"""Opening a remote MLflow server's UI from a laptop, and the end-of-run hint.

`lethe ui CONFIG` on a tracking server (http(s) URI) starts nothing: the server already
serves its UI. It prints the URL, and when the host is one a laptop cannot reach directly
it prints the command that makes it reachable:
- a Kubernetes service name (`<svc>.<namespace>.svc[.cluster.local]`, or a bare
  single-label name as pods use it): `kubectl port-forward -n <namespace> svc/<svc>
  <local port>:<service port>`, then http://127.0.0.1:<local port>;
- a private address (10/8, 172.16/12, 192.168/16, link-local; `*.internal`, `*.local`
  names) or, seen from a cluster job, the head's own loopback: an SSH tunnel through a node
  that can reach it, `ssh -N -L <local port>:<host>:<port> <user>@<node>` (for the
  shipped VM cluster: `ubuntu@$(ray get-head-ip cluster/aws-cluster.yaml)`).

The end-of-run hint is a command for the user's own machine: `lethe ui` on the config path
and overrides the run was started with (the run directory's resolved_config.yaml exists
only where the run ran), naming the server when it came from the job's environment.
Credentials never appear: a URI's user:password part is dropped, the server asks for them
(basic-auth) in the browser.
"""

from __future__ import annotations

import ipaddress
import shlex
import urllib.parse
from pathlib import Path

VM_CLUSTER_YAML = "cluster/aws-cluster.yaml"
VM_SSH_USER = "ubuntu"  # cluster/aws-cluster.yaml auth.ssh_user
_K8S_SUFFIXES = (".svc", ".svc.cluster.local")
_PRIVATE_SUFFIXES = (".internal", ".local", ".lan")


def without_credentials(uri: str) -> str:
    """`uri` without a user:password@ part (never printed)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def host_kind(host: str) -> str:
    """"k8s" (a cluster service name), "private" (an address or name only a network's
    own machines reach), "loopback", or "public"."""
    host = host.strip("[]").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return "loopback"
        if host.endswith(_K8S_SUFFIXES) or "." not in host:
            return "k8s"
        return "private" if host.endswith(_PRIVATE_SUFFIXES) else "public"
    if ip.is_loopback:
        return "loopback"
    return "private" if (ip.is_private or ip.is_link_local) else "public"


def k8s_service(host: str) -> tuple[str, str | None]:
    """(service, namespace or None) of a cluster DNS name: svc[.ns[.svc[.cluster.local]]]."""
    labels = host.lower().split(".")
    return labels[0], (labels[1] if len(labels) > 1 and labels[1] != "svc" else None)


def remote_ui_lines(uri: str, local_port: int = 5000, *, on_cluster: bool = False) -> list[str]:
    """What `lethe ui` prints for a tracking server: its URL, and where a laptop cannot
    reach the host, the tunnel command and the local URL to open once it runs.
    `on_cluster`: the URI is as a cluster job saw it (its loopback is the head node)."""
    shown = without_credentials(uri).rstrip("/")
    parts = urllib.parse.urlsplit(shown)
    host, port = parts.hostname or "", _port(parts)
    kind = host_kind(host)
    local = urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{local_port}"))
    lines = [f"MLflow tracking server: {shown} (it serves its own UI; nothing is started here)"]
    if kind == "public" or (kind == "loopback" and not on_cluster):
        lines.append(f"open {shown}")
        return lines
    if kind == "k8s":
        service, namespace = k8s_service(host)
        ns = f"-n {namespace} " if namespace else ""
        where = "" if namespace else "  (add -n <namespace> of the Ray cluster)"
        lines += [f"{host} is a Kubernetes service name, reachable inside the cluster only; "
                  "from your machine (kubectl pointed at the cluster) run:",
                  f"  kubectl port-forward {ns}svc/{service} {local_port}:{port}{where}",
                  f"then open {local}"]
        return lines
    target = "127.0.0.1" if kind == "loopback" else host
    lines += [f"{host} is {'the head node' if kind == 'loopback' else 'a private address'}, "
              "reachable inside the cluster's network only; tunnel through a node you can SSH "
              "to:",
              f"  ssh -N -L {local_port}:{target}:{port} <user>@<node>",
              f"  (the shipped VM cluster: ssh -N -L {local_port}:{target}:{port} "
              f"{VM_SSH_USER}@$(ray get-head-ip {VM_CLUSTER_YAML}))",
              f"then open {local}"]
    return lines


def ui_command(config_args: list[str] | None, fallback_config: str | Path, *,
               tracking_uri: str | None, on_cluster: bool) -> str:
    """The `lethe ui` command to paste on the user's machine: the config path and overrides
    the run was given (else `fallback_config`), plus tracking.tracking_uri=<server> when the
    server came from the environment (a laptop does not have the job's variables)."""
    args = list(config_args) if config_args else [str(fallback_config)]
    if tracking_uri and not any(a.startswith("tracking.tracking_uri=") for a in args[1:]):
        args.append(f"tracking.tracking_uri={without_credentials(tracking_uri)}")
    prog = "lethe" if on_cluster or not Path(".venv/bin/lethe").exists() else ".venv/bin/lethe"
    return shlex.join([prog, "ui", *args])


def end_of_run_hint(uri: str, config_args: list[str] | None, fallback_config: str | Path,
                    configured_uri: str | None, on_cluster: bool) -> list[str]:
    """The lines `lethe run` prints last: how to open this run's MLflow UI."""
    from orchestrator.tracking.uri import is_remote, sqlite_path

    if is_remote(uri):
        env_uri = None if configured_uri and configured_uri.strip() == uri else uri
        cmd = ui_command(config_args, fallback_config, tracking_uri=env_uri,
                         on_cluster=on_cluster)
        return ([f"[lethe] open the MLflow UI from your machine: {cmd}"]
                + [f"[lethe]   {ln}" for ln in remote_ui_lines(uri, on_cluster=on_cluster)[1:]])
    cmd = ui_command(config_args, fallback_config, tracking_uri=None, on_cluster=on_cluster)
    if not on_cluster:
        return [f"[lethe] open the MLflow UI: {cmd}  (tracking store: {uri})"]
    db = sqlite_path(uri)
    where = db if db is not None else uri
    return [f"[lethe] the MLflow store is {where}, on the cluster's storage: run {cmd} on a "
            "machine that mounts it (e.g. the head node), then tunnel its port 5000: "
            f"ssh -N -L 5000:127.0.0.1:5000 <user>@<that machine>; or log runs to an MLflow "
            "server (MLFLOW_TRACKING_URI in the job's runtime env)"]
