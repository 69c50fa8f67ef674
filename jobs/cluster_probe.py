"""A cluster smoke test to submit before a long run:

    python -m jobs.submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
        -- python -m jobs.cluster_probe [--actors N]

Places N small actors with the SPREAD strategy (default: one per alive node) and prints one
JSON line: the cluster's nodes and resources, where each actor ran, which credential
variables (orchestrator/pipeline/credentials.py) each actor sees - names only, never values -
and, for every other variable the job's runtime env sets (`env_vars` of
cluster/runtime_env.yaml), the value the driver and each actor see (null when unset). A node
that lacks HF_TOKEN or the MLflow credentials, or whose own environment shadows a runtime-env
switch, shows up here instead of hours into a run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import ray

from orchestrator.pipeline.credentials import credential_env, is_credential


def runtime_env_values() -> dict[str, str | None]:
    """The job's runtime-env variables (credentials left out: `credentials` names those) as
    this process sees them."""
    names = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    # "__RAY_..." names are Ray's own (e.g. how it passes worker_process_setup_hook)
    return {k: os.environ.get(k) for k in sorted(names)
            if not is_credential(k) and not k.startswith("__RAY")}


@ray.remote(num_cpus=0.1)
class Probe:
    def report(self) -> dict[str, object]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "credentials": sorted(credential_env()), "env": runtime_env_values()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.cluster_probe")
    p.add_argument("--actors", type=int, default=None, help="default: one per alive node")
    args = p.parse_args(argv)
    ray.init()  # inside `ray job submit`: the job's cluster
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    n_actors = args.actors or len(nodes)
    actors = [Probe.options(scheduling_strategy="SPREAD").remote() for _ in range(n_actors)]
    reports = ray.get([a.report.remote() for a in actors])
    out = {
        "nodes": [{"node_id": n["NodeID"], "resources": n.get("Resources", {})} for n in nodes],
        "actors": [{"actor_id": a._actor_id.hex(), **r} for a, r in zip(actors, reports, strict=True)],
        "driver_credentials": sorted(credential_env()),
        "driver_env": runtime_env_values(),
    }
    print("LETHE_PROBE " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
