"""The device and the numeric precision every command runs with: one resolver, one autocast.

`--device`: auto (CUDA when torch sees one, else the CPU), cpu, cuda or cuda:N. `--precision`: fp32
(no autocast), bf16 (autocast on the CPU or CUDA) or fp16 (autocast, CUDA only). This module lives in
the lowest package so that the detector, the data pipelines and the model code share it; torch is
imported inside the functions, so the CLI reads PRECISIONS without loading it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when available else the CPU; an explicit CUDA device without a GPU is a RuntimeError."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: torch sees no CUDA device; use cpu or auto")
    return dev


def _choices(allowed: Sequence[str]) -> str:
    """"a, b or c"."""
    return allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"


def check_precision(precision: str | None, allowed: Sequence[str] = PRECISIONS, flag: str = "--precision") -> None:
    """A ValueError naming `flag` and the choices when `precision` is not one of `allowed` (None passes)."""
    if precision is not None and precision not in allowed:
        raise ValueError(f"{flag} must be {_choices(allowed)}, got {precision!r}")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision to run with: the one asked for, else bf16 on CUDA and fp32 on the CPU (ValueError if it cannot run)."""
    check_precision(precision)
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast(precision: str | None, device_type: str) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for bf16 / fp16 on `device_type`; nothing for fp32 (or None)."""
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast_setting(precision: str | None) -> str | None:
    """The detector's `DetectorConfig.autocast` for a --precision: None for fp32, else the precision itself."""
    return None if precision in (None, "fp32") else precision
