"""Credentials that Ray workers need, taken from the submitting environment.

Gated hub models need HF_TOKEN on every node that loads them; an MLflow server behind
authentication needs MLFLOW_TRACKING_TOKEN (or a username / password) wherever a run is
logged; S3 artifact stores and `s3://` run directories need AWS_*. Workers started by a
cluster's raylets do not see the submitting shell's environment, so these are copied into
the job's runtime env. Only the names are ever printed (`describe`), never the values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CREDENTIAL_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
AWS_PREFIX = "AWS_"
# AWS variables that name files or profiles on the submitting machine: forwarded, they would
# point the workers' SDKs at paths that do not exist there.
AWS_LOCAL_ONLY = frozenset({
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE",
})


def is_credential(name: str) -> bool:
    """Whether `name` is one of the variables forwarded as a credential."""
    return name in CREDENTIAL_VARS or (name.startswith(AWS_PREFIX) and name not in AWS_LOCAL_ONLY)


def credential_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The credential variables set (non-empty) in `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if v and is_credential(k)}


def describe(env: Mapping[str, str]) -> str:
    """A log line naming the forwarded credentials; values are never part of it."""
    names = sorted(k for k in env if is_credential(k))
    if not names:
        return "no credentials forwarded"
    return f"forwarding credentials {', '.join(names)} (values not shown)"
