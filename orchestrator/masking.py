"""One masking function for secrets in anything that leaves the process.

MLflow params, tags and artifacts, console lines, error messages and the printed tracking
URI all go through `mask_secrets` (or `mask_obj` for nested config data). Three kinds of
secret are replaced by `***`:

- the values of environment variables whose names say "secret" (TOKEN, SECRET, PASSWORD,
  API_KEY, ACCESS_KEY, PRIVATE_KEY, CREDENTIAL, AUTH), at least 6 characters long so that a
  short value such as "1" cannot blank out unrelated text;
- the user-info part of a URL (`https://user:pass@host` -> `https://***@host`), which is
  how tracking URIs and proxies usually carry credentials;
- query parameters named like credentials (`?token=...`, `&sig=...`, `X-Amz-Signature=...`)
  and well-known token shapes (Hugging Face `hf_...`, OpenAI-style `sk-...`, GitHub `ghp_...`,
  AWS access key ids).

Environment values are read at call time, so a token exported mid-session is masked too.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH",
                          re.IGNORECASE)
_MIN_SECRET_LEN = 6
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:token|secret|password|passwd|api[_-]?key|sig|"
    r"signature|credential|auth)[A-Za-z0-9_\-]*)=)(?P<value>[^&\s#]+)", re.IGNORECASE)
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"(?:AKIA|ASIA)[A-Z0-9]{16})\b")


def secret_env_values(min_len: int = _MIN_SECRET_LEN) -> set[str]:
    """Values of environment variables named like credentials (long enough to be unique)."""
    return {v for k, v in _environ_snapshot().items()
            if _SECRET_NAME.search(k) and len(v) >= min_len}


def _environ_snapshot() -> dict[str, str]:
    """A copy of os.environ that survives other threads editing it meanwhile (MLflow's
    telemetry thread removes its own variable; iterating os.environ then raises KeyError)."""
    for _ in range(10):
        try:
            return dict(os.environ)
        except KeyError:
            continue
    return {k: v for k in list(os.environ) if (v := os.environ.get(k)) is not None}


def mask_secrets(text: str, extra: set[str] | None = None) -> str:
    """`text` with every secret (see the module docstring, plus `extra`) replaced by ***."""
    if not text:
        return text
    # Longest first: a secret that contains another must be replaced whole.
    for secret in sorted(secret_env_values() | set(extra or ()), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
    return _TOKEN_SHAPES.sub(MASK, text)


def mask_obj(obj: Any) -> Any:
    """A copy of nested dicts / lists / tuples with every string value masked (keys kept)."""
    if isinstance(obj, str):
        return mask_secrets(obj)
    if isinstance(obj, dict):
        return {k: mask_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_obj(v) for v in obj)
    return obj
