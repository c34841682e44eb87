"""Helpers shared by the evaluation and explain tests: run directories and tiny models for them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

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
