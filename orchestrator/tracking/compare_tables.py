"""The comparison's tables and text: mean ± std over seeds per (family, method), the
headline in points, paired effects with their verdicts, and the partition's noise detection.

Rows, columns and plot bars follow the config (`CompareOrder`): families in `models`
order, methods as base then `train.methods`, metrics by `evaluate.tasks` order (metrics of
one task alphabetically), so two runs of one config print the same layout. Plain pandas:
the runs come in as tables (compare_runs.py), nothing here reads a store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from orchestrator.evaluation.benchmarks import AVERAGE, benchmark_scores
from orchestrator.tracking.effect import (
    CONFIDENCE,
    PAIRS,
    PairedEffect,
    family_effects,
    pair_table,
)
from orchestrator.tracking.power import power_section

METHOD_ORDER = ("base", "sft", "ignore", "forget")
_KEYS = ("family", "method", "seed")
# Partition metrics shown in the noise-detection table, in this order.
NOISE_OVERALL = ("auroc", "precision", "recall", "f1")


@dataclass
class CompareOrder:
    """Display order (and the headline benchmarks) taken from the experiment config."""

    families: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(METHOD_ORDER))
    tasks: list[str] = field(default_factory=list)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)
    noise_kinds: list[str] = field(default_factory=list)
    confidence: float = CONFIDENCE

    @classmethod
    def from_config(cls, cfg: Any) -> CompareOrder:
        methods = ["base"] + [m for m in cfg.train.methods if m != "base"]
        return cls(families=[m.name for m in cfg.models], methods=methods,
                   tasks=list(cfg.evaluate.tasks),
                   benchmarks={k: v.model_dump() for k, v in cfg.evaluate.benchmarks.items()},
                   noise_kinds=list(cfg.data.synthetic.noise_kinds))

    def family_key(self, fam: str) -> tuple[int, str]:
        return (self.families.index(fam) if fam in self.families else len(self.families), fam)

    def method_key(self, method: str) -> tuple[int, int, str]:
        if method in self.methods:
            return (0, self.methods.index(method), method)
        return (1, METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)

    def metric_key(self, col: str) -> tuple[int, int, str, str]:
        if col in self.benchmarks:  # headline columns first, in config order, then the average
            return (0, list(self.benchmarks).index(col), "", "")
        if col == AVERAGE:
            return (0, len(self.benchmarks), "", "")
        task, _, metric = col.partition("/")
        if task in self.tasks:
            return (1, self.tasks.index(task), "", metric)
        return (2, 0, task, metric)


def mean_std_text(values: list[float], digits: int = 3, scale: float = 1.0) -> str:
    """`0.523 ± 0.012`: sample std (ddof=1) over seeds; a single seed has no spread (`± -`)."""
    vals = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return f"{mean:.{digits}f} ± -"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ------------------------------------------------------------------------------ tables


def with_benchmarks(runs: pd.DataFrame, order: CompareOrder) -> pd.DataFrame:
    """Per-run headline columns (one per benchmark, then `average`) beside the metrics."""
    if not order.benchmarks or runs.empty:
        return runs
    rows = [benchmark_scores(r, order.benchmarks) for r in runs.to_dict("records")]
    head = pd.DataFrame(rows, index=runs.index, dtype=float)
    return pd.concat([runs, head], axis=1)


def _metric_columns(runs: pd.DataFrame, order: CompareOrder) -> list[str]:
    return sorted((c for c in runs.columns if c not in _KEYS), key=order.metric_key)


def _row_order(index: Any, order: CompareOrder) -> list[tuple[str, str]]:
    return sorted(index, key=lambda fm: (order.family_key(fm[0]), order.method_key(fm[1])))


def summarise(runs: pd.DataFrame, order: CompareOrder | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(text table, means, stds): rows (family, method), columns `<task>/<metric>` (and the
    headline columns when the order names benchmarks), all in config order."""
    order = order or CompareOrder()
    runs = with_benchmarks(runs, order)
    metrics = _metric_columns(runs, order)
    grouped = runs.groupby(["family", "method"], sort=False)
    means = grouped[metrics].mean()
    stds = grouped[metrics].std(ddof=1)
    table = grouped[metrics].agg(lambda s: mean_std_text(list(s)))
    table.insert(0, "seeds", grouped.size())
    rows = _row_order(table.index, order)
    return table.loc[rows], means.loc[rows], stds.loc[rows]


def headline_table(runs: pd.DataFrame, order: CompareOrder) -> pd.DataFrame:
    """The paper's view: benchmarks and their average in points (100 × metric), mean ± std."""
    if not order.benchmarks or runs.empty:
        return pd.DataFrame()
    runs = with_benchmarks(runs, order)
    cols = [*order.benchmarks, AVERAGE]
    grouped = runs.groupby(["family", "method"], sort=False)
    table = grouped[cols].agg(lambda s: mean_std_text(list(s), digits=2, scale=100.0))
    table.insert(0, "seeds", grouped.size())
    return table.loc[_row_order(table.index, order)]


def effects(runs: pd.DataFrame, order: CompareOrder | None = None,
            pairs: tuple[tuple[str, str], ...] = PAIRS) -> list[dict[str, Any]]:
    """Paired differences per family and metric: [{family, metric, effect: PairedEffect}]."""
    order = order or CompareOrder()
    runs = with_benchmarks(runs, order)
    out: list[dict[str, Any]] = []
    if runs.empty:
        return out
    metrics = _metric_columns(runs, order)
    families = sorted(set(runs["family"]), key=order.family_key)
    for fam in families:
        sub = runs[runs["family"] == fam]
        for metric in metrics:
            per_seed = {m: dict(zip(g["seed"], g[metric], strict=True))
                        for m, g in sub.groupby("method")}
            for eff in family_effects(per_seed, pairs=pairs, confidence=order.confidence):
                out.append({"family": fam, "metric": metric, "effect": eff})
    return out


def effect_table(records: list[dict[str, Any]], scale: float = 1.0, digits: int = 3,
                 metrics: list[str] | None = None) -> pd.DataFrame:
    """Rows (family, "a − b"), a column `n` (paired seeds), one cell per metric."""
    return pair_table(records, lambda eff: eff.cell(scale, digits), metrics)


def verdict_lines(records: list[dict[str, Any]], metrics: list[str] | None = None) -> list[str]:
    """One line per (family, difference): which metrics are above the seed noise."""
    grouped: dict[tuple[str, str], list[tuple[str, PairedEffect]]] = {}
    for rec in records:
        if metrics is None or rec["metric"] in metrics:
            eff = rec["effect"]
            grouped.setdefault((rec["family"], f"{eff.a} − {eff.b}"), []).append((rec["metric"], eff))
    lines = []
    for (fam, diff), items in grouped.items():
        n = max(e.n for _, e in items)
        if n < 2:
            lines.append(f"  {fam}  {diff}: one seed: no interval, cannot tell effect from noise")
            continue
        up = [m for m, e in items if e.significant and e.mean > 0]
        down = [m for m, e in items if e.significant and e.mean < 0]
        noise = [m for m, e in items if not e.significant]
        parts = ([f"better beyond the seed noise on {', '.join(up)}"] if up else []) + (
            [f"worse beyond the seed noise on {', '.join(down)}"] if down else []) + (
            [f"within the seed noise on {', '.join(noise)}"] if noise else [])
        lines.append(f"  {fam}  {diff} ({n} paired seeds): {'; '.join(parts)}")
    return lines


def noise_table(partitions: pd.DataFrame, order: CompareOrder | None = None) -> pd.DataFrame:
    """Per family: overall AUROC / precision / recall / F1 of the negative set against the
    ground-truth noise, then per noise kind the recall and the AUROC (kind vs clean)."""
    if partitions.empty or "auroc" not in partitions.columns:
        return pd.DataFrame()
    order = order or CompareOrder()
    found = {c.split("/")[1] for c in partitions.columns if c.startswith("noise_kind/")}
    kinds = [k for k in order.noise_kinds if k in found] + sorted(found - set(order.noise_kinds))
    cols = [c for c in NOISE_OVERALL if c in partitions.columns]
    for kind in kinds:
        cols += [c for c in (f"noise_kind/{kind}/recall", f"noise_kind/{kind}/auroc")
                 if c in partitions.columns]
    table = partitions.set_index("family")[cols]
    table = table.loc[sorted(table.index, key=order.family_key)]
    return table.rename(columns=lambda c: c.replace("noise_kind/", "").replace("/", " "))


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no evaluated runs to compare)"
    return table.to_string(justify="left")


def report_text(runs: pd.DataFrame, partitions: pd.DataFrame, order: CompareOrder) -> str:
    """The whole comparison as text: methods table, headline, paired effects, noise detection."""
    if runs.empty:
        return format_table(pd.DataFrame())
    pct = f"{order.confidence:.0%}"
    legend = (f"mean over paired seeds (same seed = same data order and init) [{pct} Student-t "
              "CI]; * = the CI excludes 0: above the seed noise; one seed: no interval.")
    table = summarise(runs, order)[0]
    head_cols = [*order.benchmarks, AVERAGE] if order.benchmarks else []
    table = table.drop(columns=[c for c in head_cols if c in table.columns])
    methods = ["Methods (mean ± sample std over seeds):", format_table(table)]
    records = effects(runs, order)
    sections: list[str] = []
    if order.benchmarks:  # the paper's view first; every task metric after it
        sections += [f"Headline: average over {len(order.benchmarks)} benchmarks, in points "
                     "(100 × metric), mean ± std over seeds:", format_table(headline_table(runs, order))]
        head = effect_table(records, scale=100.0, digits=2, metrics=head_cols)
        if not head.empty:
            sections += ["", f"Headline differences in points: {legend}", format_table(head),
                         "Verdict:", *verdict_lines(records, head_cols),
                         *power_section(records, head_cols, scale=100.0, digits=2)]
        sections += ["", *methods]
    else:
        sections += methods
        diffs = effect_table(records)
        if not diffs.empty:
            sections += ["", f"Paired differences: {legend}", format_table(diffs), "Verdict:",
                         *verdict_lines(records), *power_section(records)]
    noise = noise_table(partitions, order)
    if not noise.empty:
        sections += ["", "Noise detection by the partition, per family (negative set vs the "
                     "ground-truth noise tokens; AUROC of -score as a noise detector; per kind: "
                     "recall of the negative set, AUROC of that kind's tokens vs clean tokens):",
                     noise.to_string(float_format=lambda v: f"{v:.3f}")]
    return "\n".join(sections)
