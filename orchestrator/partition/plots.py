"""histogram.png: score distribution by class, and by ground-truth noise when known."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_histogram(scores: np.ndarray, classes: np.ndarray, noise: np.ndarray | None,
                   threshold: float | None, bins: int, path: Path) -> Path:
    panels = [("by class", [("positive (+1)", classes == 1), ("negative (-1)", classes == -1)])]
    if noise is not None:
        panels.append(("by ground-truth noise", [("clean", noise == 0), ("noise", noise != 0)]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    edges = np.histogram_bin_edges(scores, bins=bins) if scores.size else np.linspace(0, 1, bins + 1)
    for ax, (title, groups) in zip(axes[0], panels, strict=True):
        for label, mask in groups:
            ax.hist(scores[mask], bins=edges, alpha=0.6, label=f"{label} n={int(mask.sum())}")
        if threshold is not None:
            ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
        ax.set_xlabel("score = CE_base - CE_ref")
        ax.set_ylabel("tokens")
        ax.set_title(f"token scores {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
