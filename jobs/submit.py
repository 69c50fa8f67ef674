"""`ray job submit` with the submitting shell's credentials in the job's runtime env.

    python -m jobs.submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
        [--working-dir .] [--no-wait] -- python -m jobs.pipeline --config configs/paper/llama3.2-1b.yaml

A runtime-env YAML cannot read environment variables, so `ray job submit --runtime-env`
alone never carries HF_TOKEN or the MLflow / AWS credentials to the workers. This wrapper
loads the YAML, adds every credential variable set in this shell
(orchestrator.pipeline.credentials) to its `env_vars`, and submits through Ray's job client.
It prints the names it forwards, never their values. With RAY_AUTH_MODE=token the client
sends the cluster token (~/.ray/auth_token) like the `ray` CLI does.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.pipeline.credentials import credential_env, describe, is_credential

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_runtime_env(runtime_env_path: str | None, working_dir: str | None,
                      environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The YAML's runtime env plus the credentials found in `environ` (default: os.environ)."""
    env: dict[str, Any] = {}
    if runtime_env_path:
        loaded = yaml.safe_load(Path(runtime_env_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{runtime_env_path}: a runtime env must be a mapping")
        env = loaded
        written = sorted(k for k in env.get("env_vars", {}) if is_credential(k))
        if written:
            # A secret in a committed YAML is the leak this wrapper exists to avoid.
            raise SystemExit(f"{runtime_env_path}: env_vars must not hold credentials "
                             f"({', '.join(written)}); export them in the shell instead")
    if working_dir:
        env["working_dir"] = working_dir
    creds = credential_env(environ)
    if creds:
        env["env_vars"] = {**env.get("env_vars", {}), **creds}
    return env


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None,
                   help="job API address (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")
    p.add_argument("--runtime-env", default=None, help="runtime env YAML (cluster/runtime_env.yaml)")
    p.add_argument("--working-dir", default=None, help="uploaded as the job's working dir")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command to run")
    args = p.parse_args(argv)
    if args.entrypoint and args.entrypoint[0] == "--":
        args.entrypoint = args.entrypoint[1:]
    if not args.entrypoint:
        p.error("give the command to run after --")
    return args


async def _tail(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    from ray.job_submission import JobSubmissionClient

    args = _parse(argv)
    runtime_env = build_runtime_env(args.runtime_env, args.working_dir)
    print(f"[jobs.submit] {describe(runtime_env.get('env_vars', {}))}", flush=True)
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=" ".join(args.entrypoint), runtime_env=runtime_env,
                               submission_id=args.submission_id)
    print(f"[jobs.submit] submitted {job_id}", flush=True)
    if args.no_wait:
        return 0
    try:
        asyncio.run(_tail(client, job_id))
    except Exception as exc:  # log streaming is best effort; the status below decides
        print(f"[jobs.submit] log stream ended: {type(exc).__name__}", file=sys.stderr)
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in _TERMINAL:
        time.sleep(2)
        status = str(client.get_job_status(job_id))
    status = status.split(".")[-1]
    print(f"[jobs.submit] {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
