"""One device resolver and one precision helper for every command (extract/devices.py), and the
extract command's hidden --autocast alias of --precision."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import pipelines.extract_job as extract_job
from cli import app
from extract.devices import autocast, autocast_setting, check_precision, resolve_device, resolve_precision


def test_check_precision_names_the_flag_and_the_choices() -> None:
    check_precision(None)
    check_precision("bf16")
    with pytest.raises(ValueError, match=r"--precision must be fp32 or bf16, got 'fp16'"):
        check_precision("fp16", ("fp32", "bf16"))


def test_resolve_precision_defaults_by_device_and_refuses_fp16_on_the_cpu() -> None:
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda")) == "bf16"  # a device object needs no GPU
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_autocast_runs_bf16_matmuls_and_fp32_runs_plain() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32
    assert autocast_setting("fp32") is None and autocast_setting("bf16") == "bf16"


def test_resolve_device_auto_and_a_missing_gpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--precision", "bf16"], "bf16"), (["--autocast", "bf16"], "bf16"), ([], None), (["--precision", "fp32"], None)],
)
def test_extract_autocast_is_a_hidden_alias_of_precision(
    monkeypatch: pytest.MonkeyPatch, tmp_path, argv: list[str], expected: str | None
) -> None:
    def capture(images: str, out: str, options: extract_job.ExtractOptions) -> None:
        raise ValueError(f"captured autocast={options.autocast}")

    monkeypatch.setattr(extract_job, "run_extract", capture)
    result = CliRunner().invoke(app, ["extract", "--images", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert result.exit_code == 2
    assert f"captured autocast={expected}" in result.output
    assert "--autocast" not in CliRunner().invoke(app, ["extract", "--help"]).output
