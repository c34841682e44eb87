"""Training logs: one JSON line per step in metrics.jsonl, TensorBoard events when installed, curves.png.

Only rank 0 writes. On resume the log is cut back to the checkpoint's step, so that the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only metrics.jsonl (+ TensorBoard scalars when the package is installed)."""

    def __init__(
        self, run_dir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            truncate_log(self.path, resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "step"); numeric fields also go to TensorBoard."""
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records up to and including `step` (atomically)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


# fields of a validation record that are not scores to draw
_VAL_BOOKKEEPING = ("step", "epoch", "samples", "split")


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of the records holding a finite number under `key`."""
    return [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and not isinstance(r[key], bool) and math.isfinite(r[key])
    ]


def curve_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What curves.png draws: panel -> {curve label: [(step, value)]}.

    Panels: "loss" (every training loss component, and validation losses as "val <name>"),
    "validation" (every other number a validation record holds: the task score, its score with
    shuffled images, vision_gap, ...), "learning rate" and "gradient norm". Empty curves are left out.
    """
    train = [r for r in records if r.get("split", "train") == "train" and "step" in r]
    val = [r for r in records if r.get("split") == "val" and "step" in r]
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {
        "loss": {}, "validation": {}, "learning rate": {}, "gradient norm": {},
    }  # fmt: skip
    for key in sorted({k for r in train for k in r if k == "loss" or k.startswith("loss_")}):
        panels["loss"][key] = _points(train, key)
    # a multi-task run validates each task apart: its curves are named by the task
    for task in sorted({r.get("task", "") for r in val}):
        mine = [r for r in val if r.get("task", "") == task]
        prefix = f"{task} " if task else ""
        for key in sorted({k for r in mine for k in r if k not in _VAL_BOOKKEEPING and k != "task"}):
            panel, label = ("loss", f"val {prefix}{key}") if key.startswith("loss") else ("validation", prefix + key)
            panels[panel][label] = _points(mine, key)
    panels["learning rate"]["lr"] = _points(train, "lr")
    panels["gradient norm"]["grad_norm"] = _points(train, "grad_norm")
    return {name: {k: v for k, v in curves.items() if v} for name, curves in panels.items()}


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Draw curve_series(metrics.jsonl) into a PNG: one panel each for losses, validation, learning rate, grad norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_series(read_metrics(metrics_path))
    # the validation panel only when the run validated; the others always, so the layout stays familiar
    names = [n for n in panels if panels[n] or n != "validation"]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.6 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        for label, pts in panels[name].items():
            val_point = name == "validation" or label.startswith("val ")
            width = 1.2 if label in ("loss", "lr", "grad_norm") else 0.8
            ax.plot(*zip(*pts, strict=True), "o--" if val_point else "-", label=label, linewidth=width)
        ax.set_ylabel(name)
        if name == "loss":
            ax.set_title("training run")
        if panels[name]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
