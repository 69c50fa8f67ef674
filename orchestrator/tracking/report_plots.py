"""Figures of the run report, returned as `data:image/png;base64,...` URIs so the page
needs no file beside it (the comparison's own bar and effect charts come from
compare_plots and are embedded the same way)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

CLASS_COLOURS = {"positive": "#2b8cbe", "negative": "#e34a33"}
CATEGORY_COLOURS = {"startup": "#9e9e9e", "data": "#66a61e", "compute": "#1b9e77",
                    "checkpoint": "#d95f02", "export": "#7570b3", "eval": "#e7298a",
                    "stage": "#bdbdbd"}
CURVE_TITLES = {"pos_loss": "loss on positive tokens", "neg_loss": "loss on negative tokens",
                "lambda": "λ (forgetting weight)", "val_loss": "validation loss (clean data)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig: Any, dpi: int = 90) -> str:
    """Render and close a matplotlib figure; its PNG as a data URI."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def histogram_uri(stats: dict[str, Any], title: str) -> str | None:
    """Score histogram per class with the global threshold; None without a histogram."""
    hist = stats.get("histogram")
    if not isinstance(hist, dict) or len(hist.get("edges") or []) < 2:
        return None
    plt = _plt()
    edges = hist["edges"]
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=False)]
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for name, colour in CLASS_COLOURS.items():
        if hist.get(name):
            ax.bar(centers, hist[name], width=width, alpha=0.65, color=colour, label=name)
    if stats.get("threshold") is not None and stats.get("mode", "global") == "global":
        ax.axvline(float(stats["threshold"]), color="black", lw=1, ls="--", label="threshold")
    ax.set_xlabel("score = CE_base − CE_ref")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_uri(fig)


def curves_uri(model: str, runs: list[Any]) -> str | None:
    """One panel per curve (positive / negative loss, λ, validation loss), one line per
    training run of the model; None when no run logged a curve."""
    keys = [k for k in CURVE_TITLES if any(k in r.series for r in runs)]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys) + 1.2, 2.9), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for run in runs:
            points = run.series.get(key)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                        ms=3, lw=1.2, label=run.label)
        ax.set_title(CURVE_TITLES[key], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # the union of lines: a run may lack a curve in the first panel
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    # One legend beside the panels: inside one it would cover the curves.
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(model, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 0.86, 1.0))
    return figure_uri(fig)


def timeline_uri(spans: list[dict[str, Any]]) -> str | None:
    """Gantt chart: one row per (stage, model), bars coloured by category, seconds from
    the first span's start."""
    if not spans:
        return None
    plt = _plt()
    t0 = min(s["start"] for s in spans)
    rows = list(dict.fromkeys((s["stage"], s["model"]) for s in sorted(spans, key=lambda s: s["start"])))
    fig, ax = plt.subplots(figsize=(9.0, 1.1 + 0.28 * len(rows)))
    seen: set[str] = set()
    for s in spans:
        y = rows.index((s["stage"], s["model"]))
        cat = s["category"]
        ax.barh(y, max(s["end"] - s["start"], 1e-3), left=s["start"] - t0, height=0.7,
                color=CATEGORY_COLOURS.get(cat, "#444444"),
                label=None if cat in seen else cat)
        seen.add(cat)
    ax.set_yticks(range(len(rows)), [f"{st} · {m}" if m not in ("-", "") else st for st, m in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from start")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(seen),
              frameon=False)  # above the axes: inside, it would hide the last bars
    fig.tight_layout()
    return figure_uri(fig)
