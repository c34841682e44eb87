"""Atomic training checkpoints and the random-number state that makes a resumed run exact.

A checkpoint is a folder `RUNDIR/checkpoints/step-N/` with the model (save_pretrained: config.json +
model.safetensors) and `trainer_state.pt` (optimiser, scheduler, grad scaler, step, data position,
RNG states, best metric). It is written under a temporary name and renamed in one step, so a killed
run never leaves a half-written `step-N`. Loading uses torch.load(weights_only=True) only.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_DIR = re.compile(r"^\..+\.tmp-(\d+)$")  # replace_folder's `.NAME.tmp-PID`
_FULL_DISK_BYTES = 1 << 20  # free space below which a failed torch.save is taken for a full disk


def capture_rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a training step draws from (python, numpy, torch CPU/CUDA, named generators)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        # numpy's state as plain values: weights_only loading admits no numpy objects
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return state


def restore_rng_state(
    state: dict[str, Any], extra_generators: dict[str, torch.Generator] | None = None
) -> None:
    """Put back what capture_rng_state() recorded."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (extra_generators or {}).items():
        if name in state["generators"]:
            gen.set_state(state["generators"][name])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel (or compiled) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any],
    keep: int = 2,
    protect: Path | None = None,
) -> Path:
    """Write checkpoints/step-N atomically, then prune to the newest `keep` (never `protect`)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        """The model, then the trainer state whose presence marks the checkpoint complete."""
        unwrap(model).save_pretrained(folder)
        _torch_save(trainer_state, folder / STATE_FILE)

    final = replace_folder(ckpt_root / f"step-{step}", fill)
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            if protect is None or old.resolve() != Path(protect).resolve():
                shutil.rmtree(old, ignore_errors=True)
    return final


def replace_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Have `fill` write a temporary sibling folder, then put it in place of `final` in one rename.

    A killed run leaves at worst a hidden `.NAME.tmp-PID` folder, never a half-written `final`.
    """
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back; nothing half-written stays
        raise
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, with a full disk reported as the OSError it is.

    torch's zip writer turns a failed write into "RuntimeError: ... unexpected pos N vs M"; a folder
    with (almost) no space left right after such a failure is what a full disk looks like.
    """
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            raise err from None
        if free < _FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, f"No space left on device while writing {path}", str(path)) from err
        raise


def remove_dead_writers_temps(folder: str | Path) -> list[Path]:
    """Delete the `.NAME.tmp-PID` folders of writers that are no longer running (killed runs); returns them.

    A folder whose PID still runs on this machine is another process's write in progress and is kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TEMP_DIR.match(path.name)
        if m and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint folders (with trainer_state.pt), oldest step first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read trainer_state.pt of a checkpoint folder (weights_only: tensors and plain containers only)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a training checkpoint (no {STATE_FILE})")
    from vilbert_core.torch_files import load_torch_file

    return load_torch_file(path)


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk so that the rename that follows is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
