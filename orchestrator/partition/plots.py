"""histogram.png: score distribution by class, and by ground-truth noise when known."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_histogram(scores: np.ndarray, classes: np.ndarray, noise: np.ndarray | None,
                   threshold: float | None, bins: int, path: Path) -> Path:
    panels = 2 if noise is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    edges = np.histogram_bin_edges(scores, bins=bins) if scores.size else np.linspace(0, 1, bins + 1)
    groups = [("positive (+1)", classes == 1), ("negative (-1)", classes == -1)]
    if noise is not None:
        groups_noise = [("clean", noise == 0), ("noise", noise != 0)]
    for ax, (title, split) in zip(axes[0], [("by class", groups),
                                            ("by ground-truth noise", groups_noise if noise is not None else [])],
                                  strict=False):
        for label, mask in split:
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
