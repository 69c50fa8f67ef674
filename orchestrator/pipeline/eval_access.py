"""The evaluation side of the preflight (pipeline/access.py): every lm-eval task the config
names, resolved as the evaluation will resolve it (orchestrator.evaluation.runner's task
manager over `evaluate.include_path`), and its dataset opened the way lm-eval opens it
(`datasets.load_dataset(dataset_path, dataset_name, **dataset_kwargs)`), streamed: the
builder, then the first row of each split the evaluation reads. A task whose dataset needs
a loading script fails here ("Dataset scripts are no longer supported"), not after the
trainings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.config import ExperimentConfig
from orchestrator.pipeline.access import _PACKAGED, FAIL, NOT_CHECKED, OK, Check, _one_line

MAX_GROUP_DEPTH = 4


def _needs_hub(path: str, kwargs: dict[str, Any]) -> bool:
    """Whether opening this dataset asks the hub: not for a local folder, nor for a
    packaged builder (json, parquet, ...) over local files."""
    if Path(path).expanduser().exists():
        return False
    if path not in _PACKAGED:
        return True
    files = kwargs.get("data_files")
    values: list[Any] = (list(files.values()) if isinstance(files, dict)
                         else [files] if files is not None else [])
    flat = [f for v in values for f in (v if isinstance(v, list) else [v])]
    return any("://" in str(f) for f in flat)


def _splits(task_cfg: dict[str, Any], shots: int) -> list[str]:
    """The splits lm-eval reads: the evaluation split (test, else validation) and, with
    shots, the few-shot split (fewshot_split, else training, else validation)."""
    evaluated = task_cfg.get("test_split") or task_cfg.get("validation_split")
    out = [evaluated] if evaluated else []
    if shots:
        fewshot = (task_cfg.get("fewshot_split") or task_cfg.get("training_split")
                   or task_cfg.get("validation_split"))
        if fewshot and fewshot not in out:
            out.append(fewshot)
    return out


def _open_dataset(task_cfg: dict[str, Any], splits: list[str]) -> str:
    """Builder + first row of each split; the text of an ok line. Raises what datasets
    raises."""
    import datasets

    path = str(task_cfg["dataset_path"])
    name = task_cfg.get("dataset_name")
    kwargs = dict(task_cfg.get("dataset_kwargs") or {})
    builder = datasets.load_dataset_builder(path, name, **kwargs)
    parts = []
    for split in splits:
        row = next(iter(builder.as_streaming_dataset(split=split)), None)
        if row is None:
            raise ValueError(f"split {split!r} has no rows")
        parts.append(f"{split}: first row has {sorted(row)[:6]}")
    rev = kwargs.get("revision")
    return (f"{path}{'/' + name if name else ''}{'@' + str(rev) if rev else ''}, builder "
            f"{builder.name}; " + "; ".join(parts))


def _origin(source: str, include: str | None) -> str:
    """Where a task's YAML comes from: evaluate.include_path (which wins), Lethe's task
    overrides (evaluation/task_data.py: registry tasks whose datasets need a loading
    script), or lm-eval's registry."""
    if include and source.startswith(str(Path(include).resolve())):
        return f"task YAML in {include}"
    try:
        from orchestrator.evaluation.task_data import OVERRIDES_DIR
    except ImportError:  # an older tree without the override folder
        return "lm-eval registry task"
    if source.startswith(str(OVERRIDES_DIR)):
        return "Lethe's override in configs/eval/lm_eval_tasks"
    return "lm-eval registry task"


def _remote_name(path: str, kwargs: dict[str, Any]) -> str:
    """How a dataset that needs the network is named in a `not checked` line."""
    if path not in _PACKAGED:
        return f"hub dataset {path}"
    files = kwargs.get("data_files")
    first = next(iter(files.values())) if isinstance(files, dict) else files
    first = first[0] if isinstance(first, list) and first else first
    host = str(first).split("/")[2] if "://" in str(first) else str(first)
    return f"{path} files from {host}"


def _task_config(manager: Any, name: str) -> tuple[str, dict[str, Any] | None, str]:
    """(kind, the task's YAML config with includes resolved, where it comes from)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None:
        return "missing", None, ""
    kind = entry.kind.name.lower()
    if entry.yaml_path is not None:
        return kind, load_yaml(entry.yaml_path, resolve_func=False), str(entry.yaml_path)
    return kind, dict(entry.cfg) if entry.cfg else None, "inline"


def _check_task(cfg: ExperimentConfig, manager: Any, name: str, label: str,
                blocked: str | None, opened: dict[str, Check], depth: int = 0) -> list[Check]:
    """The checks of task `name` (of each member of a group); `opened` remembers each
    dataset + splits already opened (TydiQA's nine languages read one dataset)."""
    what = f"eval {label}"
    kind, task_cfg, source = _task_config(manager, name)
    include = cfg.evaluate.include_path
    if kind == "missing":
        where = f"lm-eval's registry and {include}" if include else "lm-eval's registry"
        return [Check(what, FAIL, f"evaluate.tasks: {name!r} is not a task in {where}")]
    if task_cfg is None or kind in ("py_task", "tag"):
        return [Check(what, NOT_CHECKED, f"a {kind.replace('_', ' ')} ({source}): its dataset "
                      "is chosen in code, not opened here")]
    subtasks = task_cfg.get("task")
    if kind == "group" or isinstance(subtasks, list):
        if depth >= MAX_GROUP_DEPTH:
            return [Check(what, NOT_CHECKED, "groups nested too deeply to follow")]
        out: list[Check] = []
        for sub in subtasks or []:
            sub_name = sub if isinstance(sub, str) else (sub or {}).get("task")
            if isinstance(sub_name, str):
                out += _check_task(cfg, manager, sub_name, f"{label}/{sub_name}", blocked,
                                   opened, depth + 1)
        return out or [Check(what, NOT_CHECKED, f"group {name} lists no named tasks")]
    if task_cfg.get("custom_dataset") or not task_cfg.get("dataset_path"):
        return [Check(what, NOT_CHECKED, f"{source}: no dataset_path (a custom dataset "
                      "function), not opened here")]
    shots = cfg.evaluate.num_fewshot.get(name, task_cfg.get("num_fewshot") or 0)
    splits = _splits(task_cfg, shots)
    path = str(task_cfg["dataset_path"])
    kwargs = dict(task_cfg.get("dataset_kwargs") or {})
    origin = _origin(source, include)
    if blocked and _needs_hub(path, kwargs):
        return [Check(what, NOT_CHECKED, f"{_remote_name(path, kwargs)} ({origin}; splits "
                      f"{', '.join(splits)}): not opened: {blocked}")]
    key = json.dumps([path, task_cfg.get("dataset_name"), kwargs, splits], sort_keys=True,
                     default=str)
    if key not in opened:
        try:
            opened[key] = Check(what, OK, _open_dataset(task_cfg, splits))
        except Exception as exc:  # noqa: BLE001 - datasets / hub errors: all named
            opened[key] = Check(what, FAIL, f"dataset {path}: {_one_line(exc)}")
    done = opened[key]
    return [Check(what, done.status, f"{done.detail} ({origin})")]


def check_eval_tasks(cfg: ExperimentConfig, datasets_blocked: str | None) -> list[Check]:
    """One check per evaluation task (per member task of a group)."""
    ev = cfg.evaluate
    if not ev.enabled:
        return [Check("eval", OK, "evaluate.enabled=false: nothing is evaluated")]
    from orchestrator.evaluation.tasks import GEN_TASK, MC_TASK

    generated = {MC_TASK, GEN_TASK} if (cfg.data.source == "synthetic"
                                        and not ev.include_path) else set()
    out = [Check(f"eval {t}", OK, "generated here from the synthetic corpus's held-out split")
           for t in ev.tasks if t in generated]
    rest = [t for t in ev.tasks if t not in generated]
    if not rest:
        return out
    include = None
    if ev.include_path:
        include = str(Path(ev.include_path).resolve())
        if not Path(include).is_dir():
            return out + [Check("eval", FAIL, f"evaluate.include_path {ev.include_path!r}: "
                                "no such folder on this machine")]
    try:
        from orchestrator.evaluation.runner import build_task_manager

        manager = build_task_manager(rest, include)
    except Exception as exc:  # noqa: BLE001 - a broken task YAML folder: named
        return out + [Check("eval", FAIL, f"lm-eval's task manager: {_one_line(exc)}")]
    opened: dict[str, Check] = {}
    for task in rest:
        out += _check_task(cfg, manager, task, task, datasets_blocked, opened)
    return out
