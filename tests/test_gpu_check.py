"""bench/gpu_check.sh, the one-run GPU check: its plan holds together here (the run itself needs a GPU).

A dry run writes the plan and checks that every option a step passes exists in its bench script, so a
renamed option fails here rather than on the lent GPU machine. `--cpu-smoke` runs every step with tiny
sizes on the CPU (minutes: by hand, see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("machine", "cuda-tests", "detector", "extraction-job", "training-step", "batch-sweep",
         "retrieval-scoring", "batching-rule", "training-end-to-end")  # fmt: skip


NEEDS_BASH = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@NEEDS_BASH
def test_dry_run_writes_the_plan_and_every_option_exists(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": "python3"}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every option exists" in res.stdout
    plan = (tmp_path / "out" / "gpu_check.md").read_text()
    for step in STEPS:
        assert f"\n## {step}\n" in plan, step
    assert "-m pytest -m cuda" in plan
    assert "--dtypes fp32,bf16,fp16" in plan and "--batch-size 1,16" in plan and "--device cuda" in plan
    assert "MISSING OPTION" not in plan


@NEEDS_BASH
def test_a_missing_option_fails_the_dry_run(tmp_path: Path) -> None:
    script = (ROOT / "bench" / "gpu_check.sh").read_text().replace("--selection-repeats 10", "--no-such-option 1")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu_check.sh").write_text(script)
    for name in ("bench_detector.py", "bench_pipeline.py", "bench_model.py", "bench_batch_sweep.py",
                 "bench_eval.py", "bench_train.py"):  # fmt: skip
        shutil.copy(ROOT / "bench" / name, tmp_path / "bench" / name)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": "python3"}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1 and "bench/bench_detector.py has no --no-such-option" in res.stdout


def test_cuda_marker_is_registered_and_marks_the_cuda_tests(pytestconfig: pytest.Config) -> None:
    assert any(m.startswith("cuda:") for m in pytestconfig.getini("markers"))
    from test_train_masking import test_cpu_generator_masks_cuda_batches_as_it_masks_cpu_ones as needs_cuda

    assert any(m.name == "cuda" for m in needs_cuda.pytestmark)
