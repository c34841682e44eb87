"""Reading torch pickle files (reference checkpoints, trainer states) without running code.

Every `.bin`/`.pt` the project reads goes through `load_torch_file`: `torch.load(weights_only=True)`,
which admits tensors and plain containers only. torch's own refusal is a paragraph about changed
defaults and how to switch the protection off; users get one line instead, naming the file and, for a
pickle that tries to call something, what it tried to call.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)", re.IGNORECASE)
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.DOTALL)


def describe_load_error(err: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) refused or could not read a file."""
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        return (
            f"refused: the pickle calls {found.group(1)}, which could run code; only tensors and plain "
            "containers are loaded"
        )
    found = _UNPICKLER.search(text)
    if found:
        return "refused: not a plain tensor pickle (" + " ".join(found.group(1).split()) + ")"
    if isinstance(err, EOFError) or not text.strip():
        return f"not a torch file (empty or cut short: {type(err).__name__})"
    first = " ".join(text.split(". ")[0].split())
    return f"not a readable torch file ({type(err).__name__}: {first})"


def load_torch_file(path: str | Path, *, mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) on the CPU; any failure is a one-line ValueError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickler, zip reader and EOF errors all mean: this file cannot be used
        raise ValueError(f"{path}: {describe_load_error(err)}") from None
