"""Shared types of the annotation readers, and the front door that reads a task's files with its reader(s)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the first bad record."""


@dataclass(frozen=True)
class ImageRef:
    """How an annotation names its image: a file name or relative path, and/or a numeric (COCO) id."""

    path: str | None = None
    numeric_id: int | None = None

    def __str__(self) -> str:
        """Readable form for reports."""
        if self.path is not None:
            return self.path
        return f"id:{self.numeric_id}"


@dataclass
class Annotation:
    """One task record and the image it belongs to."""

    ref: ImageRef
    record: dict[str, Any]
    # Per-image side information that is not part of ann.json (VCR metadata file, RefCOCO image size).
    extra: dict[str, Any] = field(default_factory=dict)


def load_json(path: Path) -> Any:
    """Parse a JSON file, failing with an `AnnotationError` that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise AnnotationError(f"{path}: annotation file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON: {exc}") from exc


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise bad(path, f"line {lineno}", f"not valid JSON: {exc}") from exc
            yield lineno, rec


def bad(path: Path, where: str, problem: str) -> AnnotationError:
    """Build the error for the first bad record of a file."""
    return AnnotationError(f"{path}: {where}: {problem}")


def require(path: Path, where: str, record: Any, keys: Sequence[str]) -> None:
    """Check that `record` is a dict with every key in `keys`."""
    if not isinstance(record, dict):
        raise bad(path, where, f"expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise bad(path, where, f"missing field(s) {', '.join(missing)}")


def read_task_annotations(
    task: str, files: Sequence[str | Path], split: str, images_dir: str | Path | None = None
) -> list[Annotation]:
    """Read the annotation files of one task and split into `Annotation`s, with the task's reader(s)."""
    from pipelines.tasks import data_task

    paths = [Path(f) for f in files]
    if not paths:
        raise AnnotationError(f"task {task!r}: no annotation files given")
    try:
        spec = data_task(task)
    except ValueError as err:
        raise AnnotationError(str(err)) from None
    return spec.read(paths, split, images_dir)
