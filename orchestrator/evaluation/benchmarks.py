"""The headline: per-benchmark scores and their average, as the paper reports them.

A benchmark is the mean of one metric over one or more lm-eval tasks (TydiQA is nine
per-language tasks averaged with equal weight, as open-instruct's TydiQA script averages its
languages). The average gives each benchmark equal weight. Plain Python: the evaluation,
the tracking glue and the comparison share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

AVERAGE = "average"


def _value(flat: Mapping[str, Any], key: str) -> float | None:
    v = flat.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def flatten_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{task: {metric: v}} -> {"task/metric": v} (the column names of the comparison)."""
    return {f"{task}/{m}": v for task, per in metrics.items() for m, v in per.items()}


def benchmark_scores(flat: Mapping[str, Any], benchmarks: Mapping[str, Any]) -> dict[str, float | None]:
    """{name: score, ..., "average": mean of the scores} from {"task/metric": value}.

    `benchmarks` maps a name to anything with `tasks` and `metric` (BenchmarkSpec or a
    dict). A benchmark missing any of its tasks scores None (a partial language average
    would not be the benchmark), and so does the average when any benchmark is None.
    """
    out: dict[str, float | None] = {}
    for name, spec in benchmarks.items():
        tasks = spec["tasks"] if isinstance(spec, Mapping) else spec.tasks
        metric = spec["metric"] if isinstance(spec, Mapping) else spec.metric
        values = [_value(flat, f"{task}/{metric}") for task in tasks]
        out[name] = None if any(v is None for v in values) or not values else sum(values) / len(values)
    if out:
        scores = list(out.values())
        out[AVERAGE] = None if any(v is None for v in scores) else sum(scores) / len(scores)
    return out


def missing_benchmark_metrics(metrics: Mapping[str, Mapping[str, Any]],
                              benchmarks: Mapping[str, Any]) -> list[str]:
    """One line per benchmark input absent from one model's {task: {metric: value}}.

    A metric name that does not match what lm-eval reported (a task scored under two filters
    is logged as `<metric>_<filter>`, see runner.normalise_metrics) would otherwise only
    show as a blank headline cell; the line names what the task did report.
    """
    lines = []
    for name, spec in benchmarks.items():
        tasks = spec["tasks"] if isinstance(spec, Mapping) else spec.tasks
        metric = spec["metric"] if isinstance(spec, Mapping) else spec.metric
        for task in tasks:
            if task not in metrics:
                lines.append(f"evaluate.benchmarks.{name}: task {task} has no results")
            elif _value(metrics[task], metric) is None:
                lines.append(f"evaluate.benchmarks.{name}: task {task} reported no '{metric}' "
                             f"(it reported: {', '.join(sorted(metrics[task])) or 'nothing'})")
    return lines
