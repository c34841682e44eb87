"""Annotation readers: one module per public release format, each yielding `Annotation`s.

Every reader returns a list of `Annotation(ref, record)`: `ref` says which image the record belongs
to (a file name or path and/or a numeric id, matched to feature image ids by `pipelines.matching`),
`record` is the task record of `ann.json` (docs/contracts.md section 3) before the parts that need
the image's regions (VQA labels, RefCOCO IoUs) are added by the shard job.

`read_task_annotations(task, files, split)` reads a task's files with the reader(s) its spec in
`pipelines.tasks` names.
A malformed file raises `AnnotationError` naming the file and the first bad record.
"""

from __future__ import annotations

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, read_task_annotations

__all__ = ["Annotation", "AnnotationError", "ImageRef", "read_task_annotations"]
