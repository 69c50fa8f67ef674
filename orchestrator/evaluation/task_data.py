"""Where the lm-eval tasks Lethe runs get their data, and the task overrides it ships.

datasets >= 4 (Lethe pins 5.x) refuses hub datasets that need a loading script ("Dataset
scripts are no longer supported"); lm-eval issue #3171 lists 36 registry tasks whose
datasets are such. For each one a Lethe config uses, `configs/eval/lm_eval_tasks/` holds a
task of the same name that reads a script-free copy of the same data with the same prompts,
targets and metrics (tests/test_eval_overrides.py renders both on the same rows). That folder
is added to every lm-eval call (`include_paths`), before the config's own
`evaluate.include_path`, which can still replace any task.

The tables below record, for every dataset the paper's 13 tasks read, what was checked; the
guard test (tests/test_eval_overrides.py) fails when a config task reads a hub dataset found
in neither, so a newly added task cannot silently bring the loading-script failure back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Beside the configs the runs use; orchestrator/ and configs/ travel together (the image
# copies both, `ray job submit --working-dir .` uploads both), so every node finds it from
# its own copy of the package instead of a path resolved on the driver.
OVERRIDES_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval" / "lm_eval_tasks"

# Hub datasets read without a loading script by datasets 5.x, with the evidence found
# (the hub's commit history / lm-eval's PRs; not re-checked against the hub from here).
SCRIPT_FREE: dict[str, str] = {
    "truthfulqa/truthful_qa": "Parquet since 'Convert dataset to Parquet (#3)', commit "
        "741b8276f2d1982aa3d5b832d3ee81ed3b896490 (truthful_qa.py deleted); config "
        "multiple_choice, split validation (truthfulqa_mc2)",
    "aps/super_glue": "Parquet since 'Convert dataset to Parquet (#16)', commit 3de24cf "
        "(boolq/{train,validation,test}-00000-of-00001.parquet); config boolq (boolq)",
    "EleutherAI/asdiv": "Parquet since 'Convert dataset to Parquet (#1)', commit 8f95807 "
        "(asdiv.py deleted); config asdiv (the default), split validation (asdiv)",
    "google-research-datasets/tydiqa": "Parquet-native (lm-eval PR #4044, which added the "
        "tydiqa_goldp tasks for datasets >= 5); config secondary_task (tydiqa_goldp_*)",
}
# Hub datasets that hold only a loading script: {dataset: (the task overridden, what the
# override reads instead)}.
NEEDS_SCRIPT: dict[str, tuple[str, str]] = {
    "EleutherAI/logiqa": ("logiqa", "configs/eval/lm_eval_tasks/logiqa.yaml: the script's "
        "source files (github.com/lgw863/LogiQA-dataset at commit ff6c4cb) through datasets' "
        "`text` builder, parsed as the script parsed them (logiqa_source.py)"),
}
# datasets' packaged builders: with local or URL data_files they run no script.
PACKAGED_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def overridden_tasks() -> set[str]:
    """Task names defined in the overrides folder (the `task:` of each YAML there)."""
    import yaml

    names = set()
    for path in sorted(OVERRIDES_DIR.glob("*.yaml")):
        # the `!function` tags need lm-eval's loader; the task name does not
        text = path.read_text().replace("!function", "")
        name = (yaml.safe_load(text) or {}).get("task")
        if isinstance(name, str):
            names.add(name)
    return names


def include_paths(tasks: list[str], include_path: str | None) -> list[str]:
    """lm-eval's include paths for `tasks`: the overrides folder, then the config's folder
    (indexed later, so its tasks win). A requested overridden task with the folder missing
    is an error here: lm-eval's own definition would fail later, on the loading script."""
    paths = [] if include_path is None else [str(include_path)]
    if OVERRIDES_DIR.is_dir():
        return [str(OVERRIDES_DIR), *paths]
    wanted = {task for task, _ in NEEDS_SCRIPT.values()} & set(tasks)
    if wanted:
        raise FileNotFoundError(
            f"lm-eval task override folder {OVERRIDES_DIR} is missing (tasks "
            f"{sorted(wanted)} read datasets that need a loading script without it); run "
            "Lethe from its repository or image, where configs/ sits beside orchestrator/")
    return paths


def overrides_fingerprint(tasks: list[str]) -> str | None:
    """sha256 over the override files when any of `tasks` is overridden (None otherwise):
    part of an evaluation's cache key, so editing an override re-evaluates."""
    if not OVERRIDES_DIR.is_dir() or not set(tasks) & overridden_tasks():
        return None
    digest = hashlib.sha256()
    for path in sorted(OVERRIDES_DIR.iterdir()):
        if path.is_file() and path.suffix in (".yaml", ".py"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class TaskData:
    """The dataset one lm-eval task reads, as its resolved YAML names it."""

    task: str
    dataset_path: str
    dataset_name: str | None
    dataset_kwargs: dict[str, Any]
    yaml_path: str

    @property
    def overridden(self) -> bool:
        return Path(self.yaml_path).resolve().parent == OVERRIDES_DIR

    def status(self) -> tuple[bool, str]:
        """(loads with datasets 5.x as far as checked, why)."""
        if self.dataset_path in PACKAGED_BUILDERS:
            return True, f"datasets' {self.dataset_path} builder over data_files (no script)"
        if self.dataset_path in SCRIPT_FREE:
            return True, SCRIPT_FREE[self.dataset_path]
        if self.dataset_path in NEEDS_SCRIPT:
            return False, (f"{self.dataset_path} needs a loading script; Lethe's "
                           f"replacement is {NEEDS_SCRIPT[self.dataset_path][1]}, which is "
                           "not what this task resolved to")
        return False, (f"{self.dataset_path} is not recorded in orchestrator/evaluation/"
                       "task_data.py: check whether it needs a loading script (lm-eval issue "
                       "#3171) and add it to SCRIPT_FREE, or ship an override")


def resolve_task_data(tasks: list[str], include_path: str | None = None) -> list[TaskData]:
    """The dataset each task reads, resolved as the evaluation resolves it (the overrides
    folder, then `include_path`, then lm-eval's registry); group members are expanded."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from orchestrator.evaluation.runner import build_task_manager

    manager = build_task_manager(tasks, include_path)
    out: list[TaskData] = []
    todo = list(tasks)
    while todo:
        name = todo.pop(0)
        entry = manager.task_index.get(name)
        if entry is None or entry.yaml_path is None:
            raise KeyError(f"lm-eval task {name!r}: not found as a YAML task")
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
        members = cfg.get("task")
        if isinstance(members, list):  # a group: its member tasks
            todo += [m if isinstance(m, str) else m["task"] for m in members]
            continue
        out.append(TaskData(name, str(cfg.get("dataset_path")), cfg.get("dataset_name"),
                            dict(cfg.get("dataset_kwargs") or {}), str(entry.yaml_path)))
    return out
