"""Content-addressed stage directories.

A stage's output directory is named by a hash of everything that determines its result
(upstream stage keys, the config section it uses, input file fingerprints). A stage is done
when its `_SUCCESS.json` marker exists; the marker is written last, so a killed stage is
recomputed (or resumed block by block, where the stage supports it) on the next run.
Layout: `<root>/<stage>/<key>/{inputs.json, _SUCCESS.json, ...outputs}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS.json"


def content_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object; key order does not matter."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def path_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of a local file or directory: names, sizes and mtimes.

    Hashing the bytes of multi-GB checkpoints on every run would cost minutes; name, size
    and modification time change whenever the content is rewritten.
    """
    p = Path(path)
    if not p.exists():
        return {"path": str(path), "missing": True}
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    entries = []
    for q in files:
        st = q.stat()
        rel = q.name if q == p else str(q.relative_to(p))
        entries.append((rel, st.st_size, int(st.st_mtime)))
    return {"path": str(p.resolve()), "files": content_hash(entries)}


@dataclass(frozen=True)
class Stage:
    root: Path
    name: str
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return content_hash(self.inputs)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name / self.key

    def done(self) -> bool:
        return (self.dir / SUCCESS).is_file()

    def prepare(self) -> Path:
        """Create the directory and record the inputs that name it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "inputs.json").write_text(json.dumps(self.inputs, indent=2, sort_keys=True, default=str))
        return self.dir

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        body = {"stage": self.name, "key": self.key, "finished_at": time.time(), **(summary or {})}
        tmp = self.dir / (SUCCESS + ".tmp")
        tmp.write_text(json.dumps(body, indent=2, default=str))
        os.replace(tmp, self.dir / SUCCESS)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.dir / SUCCESS).read_text())
