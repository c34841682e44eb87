"""The progress bar of the extract and shard jobs: live on a terminal, a few lines a minute in a log."""

from __future__ import annotations

import sys
from typing import Any

# Off a terminal (CI logs, captured output) each redraw is a new line: redraw at most this often.
LOG_MININTERVAL_S = 30.0


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; throttled to one line per LOG_MININTERVAL_S when stderr is not a TTY."""
    from tqdm.auto import tqdm

    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        kwargs.setdefault("mininterval", LOG_MININTERVAL_S)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, **kwargs)
