"""Helpers shared by the evaluation and explain tests: run directories and tiny models for them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from vilbert_core import ViLBERTConfig

D = 16  # region feature size of these tests


def npy(a: np.ndarray) -> bytes:
    """The bytes of `a` as a .npy member."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def tiny(vocab: Path, **overrides: object) -> ViLBERTConfig:
    """The tiny preset sized for D-d regions and this vocabulary."""
    n = len(vocab.read_text().split())
    return ViLBERTConfig.preset("tiny", vocab_size=n, v_feature_size=D, **overrides)


def write_run(
    root: Path,
    model: torch.nn.Module,
    task: str,
    vocab: Path,
    answers: list[str] | None = None,
    max_text_len: int = 20,
) -> Path:
    """A run directory as `vilbert-data train` leaves it (contract s.6): weights, config, train_args.json."""
    model.save_pretrained(root)
    answers_file = None
    if answers:
        answers_file = root / "answers.json"
        answers_file.write_text(json.dumps(answers))
    args = {"task": task, "vocab": str(vocab), "num_answers": len(answers) if answers else None,
            "answers_file": str(answers_file) if answers_file else None, "max_text_len": max_text_len,
            "max_regions": 36}  # fmt: skip
    (root / "train_args.json").write_text(json.dumps(args))
    return root


def write_task_dir(root: Path, task: str, split: str, images: list[tuple[str, int, list[dict]]],
                   answers: list[str] | None = None) -> Path:  # fmt: skip
    """A TASKDIR: one sample per (image id, region count, records), task.json, answers.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(images))
    with wds.TarWriter(str(root / "task-000000.tar")) as sink:
        for image_id, k, records in images:
            x1 = rng.uniform(0, 50, k)
            boxes = np.stack([x1, x1, x1 + 20, x1 + 30], 1).astype(np.float32)
            spatial = np.concatenate([boxes / 100, np.full((k, 1), 0.06)], 1).astype(np.float32)
            prob = rng.dirichlet(np.ones(1601), k).astype(np.float16)
            sink.write(
                {
                    "__key__": image_id,
                    "features.npy": npy(rng.uniform(0, 2, (k, D)).astype(np.float16)),
                    "spatial.npy": npy(spatial),
                    "boxes.npy": npy(boxes),
                    "cls_prob.npy": npy(prob),
                    "meta.json": json.dumps(
                        {"image_id": image_id, "width": 100, "height": 100, "num_boxes": k}
                    ),
                    "ann.json": json.dumps(records),
                }
            )
    if answers is not None:
        (root / "answers.json").write_text(json.dumps(answers))
    info = {
        "task": task,
        "split": split,
        "counts": {"images": len(images), "records": sum(len(r) for _, _, r in images)},
        "features": {"dataset_json_sha256": "0" * 64, "feature_layer": "res4", "feature_dim": D},
        "answer_vocab": "answers.json" if answers is not None else None,
        "num_answers": len(answers) if answers is not None else None,
        "shards": ["task-000000.tar"],
    }
    (root / "task.json").write_text(json.dumps(info))
    return root
