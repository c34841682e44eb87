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


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Draw the training losses (each component) and the learning rate against the step into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split", "train") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    loss_keys = sorted({k for r in train for k in r if k == "loss" or k.startswith("loss_")})

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key in loss_keys:
        pts = [
            (r["step"], r[key])
            for r in train
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), label=key, linewidth=1.2 if key == "loss" else 0.8)
    for key in sorted({k for r in val for k in r if k.startswith("loss")}):
        pts = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), "o--", label=f"val {key}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    if loss_keys:
        ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    lr_pts = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if lr_pts:
        ax_lr.plot(*zip(*lr_pts, strict=True), color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
