"""Figures for evaluation reports: accuracy bars and recall@K curves (matplotlib, Agg, PNG)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A new matplotlib figure on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_accuracy_bars(
    values: Mapping[str, float], path: str | Path, title: str, ylabel: str = "accuracy (%)"
) -> Path:
    """Bar chart of accuracies (percent) by category, e.g. VQA answer type or RefCOCO split."""
    fig, ax = _figure(max(4.0, 1.2 * len(values) + 2), 3.5)
    names = list(values)
    heights = [float(values[n]) for n in names]
    bars = ax.bar(names, heights, color="#4477aa")
    for bar, h in zip(bars, heights, strict=True):
        ax.annotate(f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_accuracy_comparison(
    series: Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str = "accuracy (%)"
) -> Path:
    """Grouped bars: one group per category (e.g. answer type), one bar per series (model, baselines)."""
    names = list(series)
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    width = 0.8 / max(len(names), 1)
    fig, ax = _figure(max(5.0, 0.5 * len(categories) * len(names) + 2.5), 3.8)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(categories))]
        heights = [float(series[name].get(c, float("nan"))) for c in categories]
        bars = ax.bar(xs, heights, width, label=name, color=f"C{i % 10}")
        for bar, h in zip(bars, heights, strict=True):
            if h == h:  # not NaN
                ax.annotate(f"{h:.0f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(categories)), categories, rotation=20 if len(categories) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(len(names), 4), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def recall_curve(ranks: torch.Tensor, max_k: int) -> list[float]:
    """Recall@K in percent for K = 1..max_k from 0-based ranks."""
    r = ranks.long()
    counts = torch.bincount(r.clamp(max=max_k), minlength=max_k + 1)[:max_k]
    return (100.0 * counts.cumsum(0).double() / max(r.numel(), 1)).tolist()


def plot_recall_curves(
    curves: Mapping[str, torch.Tensor], path: str | Path, title: str, max_k: int = 50
) -> Path:
    """Recall@K curves (K = 1..max_k) for several rank sets, e.g. image/text retrieval, full/100 candidates."""
    fig, ax = _figure(6.0, 4.0)
    ks = list(range(1, max_k + 1))
    for n, (name, ranks) in enumerate(curves.items()):
        # candidate-protocol curves dashed: they coincide with the full ones on small test sets
        style = "--" if "cand" in name else "-"
        ax.step(ks, recall_curve(ranks, max_k), where="post", linestyle=style, color=f"C{n % 10}", label=name)
    for k in (1, 5, 10):
        ax.axvline(k, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xticks([1, 5, 10, max_k], [str(k) for k in (1, 5, 10, max_k)])
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 101)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
