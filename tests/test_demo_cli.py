"""The new user's path: every command's --help, --version, and the demo chain end to end at a reduced size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["extract", "inspect", "shard", "vocab", "train", "eval", "explain", "demo"]


def test_every_command_has_help() -> None:
    """`vilbert-data --help` lists every command, and each command's --help exits 0 with an example."""
    runner = CliRunner()
    top = runner.invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0, top.output
    for name in COMMANDS:
        assert name in top.output, f"{name} missing from --help"
        res = runner.invoke(cli.app, [name, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, f"{name} --help: {res.output}"
        assert "Example" in res.output or "example" in res.output, f"{name} --help has no example"


def test_version() -> None:
    """--version prints the installed distribution's version."""
    from importlib.metadata import version

    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"vilbert-data {version('vilbert-data')}"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, after checking that Pillow decodes it fully."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


@pytest.mark.slow
def test_demo_runs_end_to_end_at_reduced_size(tmp_path: Path) -> None:
    """`vilbert-data demo` on a 9-image sample writes every artefact, each valid, and a consistent summary."""
    sys.path.insert(0, str(REPO / "demo"))
    try:
        from generate_sample import generate
    finally:
        sys.path.pop(0)
    sample = tmp_path / "sample"
    counts = generate(sample, n_train=6, n_val=3)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--out", str(out), "--sample", str(sample), "--pretrain-steps", "2",
         "--steps", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # every step's command is printed so the user can rerun it
    assert proc.stdout.count("$ vilbert-data ") == 12
    assert "RANDOM weights" in proc.stderr

    # features: one ok row per image, shards readable, dataset.json consistent
    ds = json.loads((out / "features" / "dataset.json").read_text())
    n_images = counts["train"]["images"] + counts["val"]["images"]
    assert ds["counts"]["ok"] == n_images and ds["counts"]["failed"] == 0
    rows = pq.read_table(sorted((out / "features").glob("features-*.parquet"))).to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * n_images
    _png_size(out / "inspect.png")

    # task shards: VQA train built the answer list, val reused it
    answers = json.loads((out / "tasks" / "vqa_train" / "answers.json").read_text())
    assert len(answers) > 1
    for task_dir, n in [("captions_train", counts["train"]["images"]), ("vqa_train", counts["train"]["images"]),
                        ("vqa_val", counts["val"]["images"]), ("captions_val", counts["val"]["images"])]:
        info = json.loads((out / "tasks" / task_dir / "task.json").read_text())
        assert info["counts"]["images"] == n, (task_dir, info["counts"])

    # runs: both stages trained the asked number of steps and saved a loadable model
    for run, n_steps in (("pretrain", 2), ("vqa", 4)):
        run_dir = out / "runs" / run
        assert (run_dir / "model.safetensors").stat().st_size > 0
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert max(steps) == n_steps
        assert np.isfinite([json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text()
                            .splitlines() if '"loss"' in line]).all()

    # eval: official-format predictions for every held-out question, and the summary table
    metrics = json.loads((out / "reports" / "vqa_val" / "metrics.json").read_text())
    split = next(iter(metrics["splits"].values()))
    assert split["num_questions"] == counts["val"]["questions"]
    assert 0.0 <= split["overall"] <= 100.0
    preds = json.loads(next((out / "reports" / "vqa_val").glob("*predictions*.json")).read_text())
    assert len(preds) == counts["val"]["questions"] and set(preds[0]) == {"question_id", "answer"}
    assert all(p["answer"] in answers for p in preds)
    summary = (out / "summary.md").read_text()
    assert f"| overall | {split['overall']:.2f} |" in summary
    # the model beside what a blind model scores, and a verdict on whether it looks at the image
    assert "| question-only prior |" in summary and "| images shuffled |" in summary
    assert ("Vision helps" in summary) is (split["vision"]["uses_image"] and split["vision"]["beats_question_prior"])
    pretrain = json.loads((out / "reports" / "pretrain_val" / "metrics.json").read_text())["splits"]["val"]
    assert f"alignment accuracy {pretrain['alignment_accuracy']:.2f}" in summary
    _png_size(out / "explain.png")
