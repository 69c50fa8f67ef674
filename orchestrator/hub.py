"""What the model and data sides share about the Hugging Face hub: how a commit looks,
whether the hub may be asked, and asking it which commit a revision names."""

from __future__ import annotations

import os
import re

COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a full commit sha: already pinned


def hub_offline(*env_names: str) -> bool:
    """True when HF_HUB_OFFLINE (or one of `env_names`, e.g. HF_DATASETS_OFFLINE) is set."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", *env_names))


def hub_commit(repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """The commit the hub says `revision` of `repo_id` names now (`repo_type` "model" or
    "dataset"), or None when the hub does not answer or does not know the id. Callers check
    `hub_offline` first."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    info = api.dataset_info if repo_type == "dataset" else api.model_info
    try:
        return info(repo_id, revision=revision).sha
    except (HfHubHTTPError, OSError, ValueError):
        return None
