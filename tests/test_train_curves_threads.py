"""curves.png draws every validation number and the gradient norm; torch threads fit the cores a run may use."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vilbert_core.training import distributed
from vilbert_core.training.distributed import configure_threads, thread_budget
from vilbert_core.training.metrics_log import curve_series, plot_curves

RECORDS = [
    {"step": 1, "epoch": 0, "loss": 2.0, "loss_vqa": 2.0, "lr": 1e-4, "grad_norm": 3.0, "samples": 8},
    {"step": 2, "epoch": 0, "loss": 1.5, "loss_vqa": 1.5, "lr": 2e-4, "grad_norm": float("nan"), "samples": 16},
    {"step": 2, "split": "val", "vqa_score": 0.4, "samples": 14, "vqa_score_images_shuffled": 0.3, "vision_gap": 0.1},
    {"step": 3, "epoch": 1, "loss": 1.0, "loss_vqa": 1.0, "lr": 1e-4, "grad_norm": 1.0, "samples": 24},
    {"step": 3, "split": "val", "vqa_score": 0.5, "samples": 14, "vqa_score_images_shuffled": 0.3, "vision_gap": 0.2},
]


def test_curve_series_holds_every_validation_metric_and_the_grad_norm() -> None:
    panels = curve_series(RECORDS)
    assert panels["validation"] == {
        "vqa_score": [(2, 0.4), (3, 0.5)],
        "vqa_score_images_shuffled": [(2, 0.3), (3, 0.3)],
        "vision_gap": [(2, 0.1), (3, 0.2)],
    }
    assert panels["gradient norm"] == {"grad_norm": [(1, 3.0), (3, 1.0)]}  # the NaN is not drawn
    assert panels["loss"] == {"loss": [(1, 2.0), (2, 1.5), (3, 1.0)], "loss_vqa": [(1, 2.0), (2, 1.5), (3, 1.0)]}
    assert panels["learning rate"] == {"lr": [(1, 1e-4), (2, 2e-4), (3, 1e-4)]}
    # a validation loss goes with the training losses
    assert curve_series([{"step": 4, "split": "val", "loss": 0.7}])["loss"] == {"val loss": [(4, 0.7)]}


def test_plot_curves_draws_a_panel_per_kind(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with_val = plot_curves(metrics, tmp_path / "with_val.png")
    metrics.write_text("".join(json.dumps(r) + "\n" for r in RECORDS if r.get("split") != "val"))
    without = plot_curves(metrics, tmp_path / "without.png")
    with Image.open(with_val) as a, Image.open(without) as b:
        # 4 panels (loss, validation, learning rate, gradient norm) against 3 without validation records
        assert a.size[0] == b.size[0] and a.size[1] > b.size[1]


@pytest.mark.parametrize(
    ("cores", "local", "workers", "expected"),
    [(2, 1, 1, 1), (2, 1, 2, 1), (8, 1, 2, 6), (8, 2, 2, 2), (16, 4, 0, 4), (4, 8, 0, 1)],
)
def test_thread_budget_leaves_a_core_per_loader_worker(cores, local, workers, expected) -> None:
    assert thread_budget(workers, cores=cores, local_processes=local) == expected


def test_configure_threads_follows_the_affinity_mask_and_the_knobs(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda _pid: {0, 1})  # a 2-core slice
        torch.set_num_threads(2)
        assert configure_threads(num_workers=1) == 1 == torch.get_num_threads()  # 2 cores - 1 loader worker
        torch.set_num_threads(2)
        assert configure_threads(num_workers=0) == 2 == torch.get_num_threads()
        assert configure_threads(num_workers=1, requested=3) == 3 == torch.get_num_threads()  # --threads wins
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting is left alone
        assert configure_threads(num_workers=1) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
