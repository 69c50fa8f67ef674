"""`lethe plan CONFIG --check`: open everything a run will read, before any GPU minute is
spent, and say for each what was found. `jobs.pipeline` (`lethe run --check`) runs the same
checks before its first stage and stops on a failure.

Checked, without downloading whole datasets or weights:
- the training data: the dataset at the commit the run pins (the commit recorded in the run
  directory, else the one the branch names now), its builder and first row, and that row's
  shape against `data.format` (through the chat formatter's own row validation);
- every evaluation task: resolved through lm-eval's task manager with
  `evaluate.include_path` (so an override YAML wins over the registry's task), its
  dataset's builder and the first row of each split the evaluation reads (the evaluation
  split, and the few-shot split when the config asks for shots);
- every model: its config and tokenizer (AutoConfig / AutoTokenizer at `revision`,
  `trust_remote_code` only when the model's config says so), and that the tokenizer fits
  the embedding (preflight.check_vocabulary);
- MLflow: the tracking store, and for a server that it answers and accepts this process's
  credentials (tracking/uri.check_reachable: HTTP 401 / 403 is a failure, named).

Each check ends `ok`, `FAIL` or `not checked`: the last when the hub may not be asked here
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or the hub does not answer). A `not checked` is
no pass: the line says what was left unopened. Local paths never need the hub, so a config
of local files and folders is checked completely offline.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig, ModelSpec

OK, FAIL, NOT_CHECKED = "ok", "FAIL", "not checked"
DETAIL_MAX = 400
# datasets' packaged builders: a dataset of local files under one of these needs no hub.
_PACKAGED = {"json", "csv", "parquet", "text", "arrow", "pandas"}
_ON = ("1", "true", "yes", "on")


@dataclass
class Check:
    what: str  # "data", "eval <task>", "model <name>", "mlflow"
    status: str  # OK | FAIL | NOT_CHECKED
    detail: str

    def line(self) -> str:
        return f"  {self.status:<12} {self.what:<26} {self.detail}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    if len(first) > DETAIL_MAX:
        first = first[:DETAIL_MAX] + "..."
    return f"{type(exc).__name__}: {first}" if type(exc).__name__ not in first else first


def hub_unreachable() -> str | None:
    """None when the Hugging Face hub answers (any HTTP status); else why not."""
    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(constants.ENDPOINT, timeout=5.0):  # noqa: S310
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"the hub ({constants.ENDPOINT}) does not answer: {getattr(exc, 'reason', exc)}"


def offline_switch(*names: str) -> str | None:
    """The first of `names` set to an on value, as `NAME=value`; None when none is."""
    for name in names:
        if os.environ.get(name, "").strip().lower() in _ON:
            return f"{name}={os.environ[name]}"
    return None


def hub_blocks(unreachable: str | None) -> tuple[str | None, str | None]:
    """(why hub datasets may not be opened, why hub models may not), None = they may."""
    def why(*names: str) -> str | None:
        switch = offline_switch(*names)
        if switch:
            return f"{switch} (set it to 0 where the hub is reachable)"
        return unreachable

    return why("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), why("HF_HUB_OFFLINE")


# --------------------------------------------------------------------------- training data


def _pinned_dataset_commit(cfg: ExperimentConfig, name: str, requested: str | None) -> tuple[str | None, str]:
    """(commit, where it came from): the run directory's record (stage "dataset") when a
    run pinned one, else what `requested` resolves to now (the cache, then the hub)."""
    from orchestrator.cache import Stage
    from orchestrator.data.loading import resolve_dataset_revision
    from orchestrator.pipeline.stages import stages_root

    st = Stage(stages_root(cfg), "dataset", {"dataset": name, "revision": requested})
    if st.done():
        commit = st.summary().get("revision")
        if commit:
            return commit, "pinned in the run directory"
    commit = resolve_dataset_revision(name, requested)
    return commit, f"what {requested or 'the default branch'} names now; the run pins it"


def _first_local_row(path: str, cfg: ExperimentConfig) -> Any:
    """The first row of a local source that parses (a line that does not is the run's
    reject, counted there); DataError when there is none among the first 100."""
    from orchestrator.data.errors import DataError, RowRejected
    from orchestrator.data.loading import iter_path_rows

    seen = []
    for i, row in enumerate(iter_path_rows(path, cfg.data.split, cfg.data.max_row_chars)):
        if not isinstance(row, RowRejected):
            return row
        seen.append(str(row))
        if i >= 99:
            break
    raise DataError(f"{path}: no readable row among the first {len(seen) or 0} "
                    f"({seen[0] if seen else 'the source is empty'})")


JSON_HEAD_BYTES = 1 << 20


def _hub_file(name: str, revision: str | None, file: str) -> Any:
    """A hub dataset file opened for reading (huggingface_hub's file system: ranged reads)."""
    from huggingface_hub import HfFileSystem

    at = f"@{revision}" if revision else ""
    return HfFileSystem().open(f"datasets/{name}{at}/{file}", "rb", block_size=JSON_HEAD_BYTES)


def first_json_array_row(open_file: Any, head_bytes: int = JSON_HEAD_BYTES) -> Any:
    """The first element of a JSON file holding an array of rows, read from its first
    `head_bytes` (datasets' json builder parses such a file whole, even when streaming: the
    paper's 50k-row sample would be downloaded in full). None when the file is no array or
    its first row is longer than that: the caller streams it then."""
    with open_file() as fh:
        head = fh.read(head_bytes)
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if not text.startswith("["):
        return None
    body = text[1:].lstrip()
    try:
        row, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return None
    return row


def _format_problem(row: Any, cfg: ExperimentConfig) -> str | None:
    """Why the row does not fit data.format, by the formatter's own row validation."""
    from orchestrator.data.chat_format import conversation_from_row
    from orchestrator.data.errors import RowRejected

    fmt = cfg.data.format
    # data.columns / data.roles (renamed keys) where the config has them
    extra = {k: getattr(cfg.data, k) for k in ("columns", "roles")
             if getattr(cfg.data, k, None) is not None}
    try:
        conversation_from_row(row, fmt, **extra)
    except RowRejected as exc:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        return f"the first row does not fit data.format={fmt} ({exc}); its keys: {keys}"
    return None


def check_training_data(cfg: ExperimentConfig, datasets_blocked: str | None) -> Check:
    d = cfg.data
    if d.source == "synthetic":
        return Check("data", OK, "the synthetic corpus is generated here (nothing to open)")
    path = str(d.path)
    local = Path(path).expanduser().exists()
    try:
        if local or d.source == "file":
            if not local:
                nearest = Path(path).expanduser().parent
                while not nearest.exists() and nearest != nearest.parent:
                    nearest = nearest.parent
                return Check("data", FAIL, f"data.path {path!r}: no such file or folder on "
                             f"this machine (nearest existing folder: {nearest})")
            row = _first_local_row(path, cfg)
            where = f"{path} (local)"
        else:
            from orchestrator.data.loading import split_hub_ref

            name, requested = split_hub_ref(path, d.revision)
            if datasets_blocked:
                files = getattr(d, "data_files", None)
                return Check("data", NOT_CHECKED, f"hub dataset {name}"
                             + (f" file {files}" if files else "") + f" (split {d.split}): "
                             f"builder and first row not opened: {datasets_blocked}")
            import datasets

            commit, source = _pinned_dataset_commit(cfg, name, requested)
            # data.data_files (where the config has it): one file of the repository
            files = getattr(d, "data_files", None)
            if files is None and path.startswith("hf://"):
                from orchestrator.data.loading import hub_data_files

                files = hub_data_files(path)
            kwargs = {"data_files": files} if files else {}
            builder = datasets.load_dataset_builder(name, revision=commit or requested, **kwargs)
            row = None
            if files and str(files).endswith(".json") and "*" not in str(files):
                # a JSON array streams only whole: read its head instead
                row = first_json_array_row(lambda: _hub_file(name, commit or requested, files))
            if row is None:
                row = next(iter(builder.as_streaming_dataset(split=d.split)))
            at = f"@{commit[:12]} ({source})" if commit else " (unpinned)"
            of = f" file {files}" if files else ""
            where = f"{name}{at}{of}, builder {builder.name}, split {d.split}"
    except StopIteration:
        return Check("data", FAIL, f"{path}: split {d.split!r} has no rows")
    except Exception as exc:  # noqa: BLE001 - datasets / hub errors have many types: all named
        return Check("data", FAIL, f"{path}: {_one_line(exc)}")
    problem = _format_problem(row, cfg)
    if problem:
        return Check("data", FAIL, f"{where}: {problem}")
    keys = sorted(row) if isinstance(row, dict) else []
    return Check("data", OK, f"{where}: first row has {keys}, fits data.format={d.format}")


# ------------------------------------------------------------------------------- models


def check_model(cfg: ExperimentConfig, spec: ModelSpec, models_blocked: str | None) -> Check:
    what = f"model {spec.name}"
    if spec.from_config is not None:
        return Check(what, OK, "built from config here; tokenizer "
                     + ("trained on the corpus" if spec.tokenizer == "train" else str(spec.tokenizer)))
    if spec.gguf is not None:
        return Check(what, OK, f"GGUF file {spec.gguf.path()} (tokenizer inside it)")
    from orchestrator.config import ConfigError
    from orchestrator.pipeline.preflight import check_pretrained_path, looks_like_path

    value = str(spec.pretrained)
    local = looks_like_path(value) or Path(value).expanduser().exists()
    if local:
        try:
            check_pretrained_path(spec, where=f"model '{spec.name}'")
        except ConfigError as exc:
            return Check(what, FAIL, _one_line(exc))
    tok_source = spec.tokenizer if spec.tokenizer not in (None, "train") else value
    tok_local = tok_source == value and local or Path(str(tok_source)).expanduser().exists()
    if models_blocked and not (local and tok_local):
        return Check(what, NOT_CHECKED, f"hub model {value}"
                     + (f"@{spec.revision}" if spec.revision else "")
                     + f": config and tokenizer not opened: {models_blocked}")
    try:
        from transformers import AutoConfig, AutoTokenizer

        from orchestrator.pipeline.preflight import check_vocabulary

        kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
        if spec.revision is not None:
            kwargs["revision"] = spec.revision
        config = AutoConfig.from_pretrained(value, **kwargs)
        tok_kwargs = kwargs if tok_source == value else {"trust_remote_code": spec.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **tok_kwargs)
        check_vocabulary(spec, value, tokenizer)
    except Exception as exc:  # noqa: BLE001 - hub / transformers errors: all named
        return Check(what, FAIL, f"{value}: {_one_line(exc)}")
    at = f"@{spec.revision}" if spec.revision else ""
    return Check(what, OK, f"{value}{at}{' (local)' if local else ''}: "
                 f"{type(config).__name__}, tokenizer {type(tokenizer).__name__} "
                 f"({len(tokenizer)} tokens)")


# ------------------------------------------------------------------------------- mlflow


def check_mlflow(cfg: ExperimentConfig) -> Check:
    """The tracking store: a server must answer and take this process's credentials; a
    local store's folder must be creatable (nothing is created here)."""
    from orchestrator.masking import mask_secrets
    from orchestrator.tracking.uri import (
        TrackingError,
        check_reachable,
        credential_names,
        is_remote,
        resolve_tracking_uri,
        sqlite_path,
    )

    if not cfg.tracking.enabled:
        return Check("mlflow", OK, "tracking.enabled=false: nothing is logged")
    root = Path(cfg.run_dir).resolve() / cfg.name
    uri = resolve_tracking_uri(cfg.tracking, root)
    shown = mask_secrets(uri)
    if is_remote(uri):
        try:
            check_reachable(uri, timeout=5.0)
        except TrackingError as exc:
            return Check("mlflow", FAIL, _one_line(exc))
        return Check("mlflow", OK, f"{shown} answers and accepts the credentials "
                     f"({credential_names()})")
    db = sqlite_path(uri)
    if db is None:
        return Check("mlflow", OK, f"{shown}: a local store, opened when the run starts")
    folder = db.resolve().parent
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not os.access(nearest, os.W_OK):
        return Check("mlflow", FAIL, f"{shown}: {nearest} is not writable here, so the store "
                     "cannot be created (set MLFLOW_TRACKING_URI to a server, or run_dir to "
                     "a writable folder)")
    return Check("mlflow", OK, f"{shown}: a local sqlite store"
                 + ("" if folder.exists() else f" (its folder is created under {nearest})"))


# --------------------------------------------------------------------------------- all


def run_checks(cfg: ExperimentConfig) -> list[Check]:
    """Every check, in the order a run needs them."""
    from orchestrator.pipeline.eval_access import check_eval_tasks

    offline = offline_switch("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    # Asked once, and only when no switch already says offline.
    datasets_blocked, models_blocked = hub_blocks(None if offline else hub_unreachable())
    if offline and not offline_switch("HF_HUB_OFFLINE"):  # datasets offline, models not
        models_blocked = hub_blocks(hub_unreachable())[1]
    checks = [check_training_data(cfg, datasets_blocked)]
    checks += [check_model(cfg, spec, models_blocked) for spec in cfg.models]
    checks += check_eval_tasks(cfg, datasets_blocked)
    checks.append(check_mlflow(cfg))
    return checks


def format_checks(checks: list[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in (OK, NOT_CHECKED, FAIL)}
    lines = ["access checks (what the run reads, opened now; nothing downloaded in full):"]
    lines += [c.line() for c in checks]
    lines.append(f"checks: {counts[OK]} ok, {counts[NOT_CHECKED]} not checked, "
                 f"{counts[FAIL]} failed")
    return "\n".join(lines)


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAIL]


def run_check_command(cfg: ExperimentConfig) -> int:
    """`lethe plan CONFIG --check`: print one line per check; 1 when any failed."""
    checks = run_checks(cfg)
    print(format_checks(checks), flush=True)
    return 1 if failed(checks) else 0


def preflight_or_raise(cfg: ExperimentConfig) -> None:
    """Before a run's first stage (`lethe run --check`, jobs.pipeline): print the checks and
    raise LetheError naming the failed ones."""
    from orchestrator.errors import LetheError

    checks = run_checks(cfg)
    print(format_checks(checks), flush=True)
    bad = failed(checks)
    if bad:
        names = "; ".join(f"{c.what}: {c.detail}" for c in bad)
        raise LetheError(f"preflight: {len(bad)} check(s) failed before any stage ran: {names}")
