"""Plots of the comparison: method bars with seed-std error bars, paired effects with CIs.

Both take the display order from `CompareOrder`, so bars and legends follow the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from orchestrator.tracking.compare import CompareOrder


def _order(order: CompareOrder | None) -> CompareOrder:
    from orchestrator.tracking.compare import CompareOrder

    return order or CompareOrder()


def bar_charts(means: pd.DataFrame, stds: pd.DataFrame, out_dir: str | Path,
               order: CompareOrder | None = None, scale: float = 1.0) -> list[Path]:
    """One grouped bar chart per metric: families on x, one bar per method, error bars =
    sample std over seeds (none with one seed). Bars and legend follow the config order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = _order(order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    families = sorted(dict.fromkeys(means.index.get_level_values(0)), key=order.family_key)
    methods = sorted(set(means.index.get_level_values(1)), key=order.method_key)
    width = 0.8 / max(len(methods), 1)
    paths = []
    for metric in means.columns:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(families) + 2), 3.6))
        for j, method in enumerate(methods):
            xs, ys, errs = [], [], []
            for i, fam in enumerate(families):
                if (fam, method) in means.index:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(means.loc[(fam, method), metric] * scale)
                    err = stds.loc[(fam, method), metric]
                    errs.append(0.0 if pd.isna(err) else err * scale)
            ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=method)
        ax.set_xticks(range(len(families)), families)
        ax.set_ylabel(metric + (" (points)" if scale != 1.0 else ""))
        ax.set_title(f"{metric} (error bars: std over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"compare_{metric.replace('/', '__')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def effect_chart(records: list[dict[str, Any]], metric: str, out_dir: str | Path,
                 order: CompareOrder | None = None, scale: float = 1.0) -> Path | None:
    """Paired differences of one metric per family with their confidence intervals as error
    bars (a bar without whiskers: one seed, no interval); the zero line is the noise test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = _order(order)
    recs = [r for r in records if r["metric"] == metric and r["effect"].mean is not None]
    if not recs:
        return None
    families = sorted({r["family"] for r in recs}, key=order.family_key)
    diffs = list(dict.fromkeys(f"{r['effect'].a} − {r['effect'].b}" for r in recs))
    width = 0.8 / len(diffs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(families) + 2), 3.6))
    for j, diff in enumerate(diffs):
        xs, ys, lo, hi = [], [], [], []
        for i, fam in enumerate(families):
            eff = next((r["effect"] for r in recs if r["family"] == fam
                        and f"{r['effect'].a} − {r['effect'].b}" == diff), None)
            if eff is None:
                continue
            xs.append(i + (j - (len(diffs) - 1) / 2) * width)
            ys.append(eff.mean * scale)
            lo.append(0.0 if eff.lo is None else (eff.mean - eff.lo) * scale)
            hi.append(0.0 if eff.hi is None else (eff.hi - eff.mean) * scale)
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=4, label=diff)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(families)), families)
    ax.set_ylabel(f"difference in {metric}" + (" (points)" if scale != 1.0 else ""))
    ax.set_title(f"paired difference over seeds, {order.confidence:.0%} Student-t CI", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / f"effect_{metric.replace('/', '__')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
