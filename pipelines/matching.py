"""Which feature image an annotation's image reference names.

The rule, tried in order (the first step that gives one image wins):

1. the reference's path is itself a feature image id (`"COCO_val2014_000000000042"`);
2. the reference's file stem (file name without directories and extension) is the stem of the
   `source` of exactly one feature image. When several feature images share the stem
   (`train/0001.jpg`, `val/0001.jpg`), the one whose source path shares the most trailing directory
   components with the reference wins, if it is the only one; otherwise the reference is ambiguous;
3. the reference's numeric id (a COCO / VQA `image_id`) equals the number that ends exactly one
   feature image's file stem (`COCO_train2014_000000123456` and `000000123456` both give 123456);
4. otherwise the annotation's image has no features: it is reported, and the job goes on.

Only feature images with status "ok" take part. The index holds one entry per image (sources are
kept only for stems that collide), so it stays small for millions of images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pipelines.annotations import ImageRef

_TRAILING_DIGITS = re.compile(r"(\d+)$")


def path_parts(path: str) -> list[str]:
    """Directory components and stem of a path or URL path: 'a\\b/c.d.jpg' -> ['a', 'b', 'c.d']."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return []
    last = parts[-1]
    if "." in last[1:]:
        last = last[: last.rindex(".")]
    return parts[:-1] + [last]


def trailing_number(stem: str) -> int | None:
    """Number at the end of a file stem, or None."""
    m = _TRAILING_DIGITS.search(stem)
    return int(m.group(1)) if m else None


@dataclass
class MatchResult:
    """Outcome of matching one reference: the image id, or why there is none ('missing'/'ambiguous')."""

    image_id: str | None
    reason: str = ""
    candidates: list[str] = field(default_factory=list)


class ImageMatcher:
    """Index of feature images (id, source path) answering `match(ImageRef)` with the documented rule."""

    def __init__(self, images: Iterable[tuple[str, str | None]]) -> None:
        self.ids: set[str] = set()
        by_stem: dict[str, list[tuple[str, list[str]]]] = {}
        self._by_number: dict[int, str | None] = {}  # None marks a number shared by several images
        for image_id, source in images:
            self.ids.add(image_id)
            parts = path_parts(source) if source else [image_id]
            stem = parts[-1] if parts else image_id
            by_stem.setdefault(stem, []).append((image_id, parts))
            number = trailing_number(stem)
            if number is not None:
                self._by_number[number] = None if number in self._by_number else image_id
        # Paths are kept only where stems collide; a unique stem maps straight to its id.
        self._by_stem: dict[str, str | list[tuple[str, list[str]]]] = {
            stem: group[0][0] if len(group) == 1 else group for stem, group in by_stem.items()
        }

    def __len__(self) -> int:
        """Number of feature images indexed."""
        return len(self.ids)

    def match(self, ref: ImageRef) -> MatchResult:
        """Feature image id for an annotation's image reference (rule in the module docstring)."""
        if ref.path is not None:
            if ref.path in self.ids:
                return MatchResult(ref.path)
            parts = path_parts(ref.path)
            entry = self._by_stem.get(parts[-1]) if parts else None
            if isinstance(entry, str):
                return MatchResult(entry)
            if isinstance(entry, list):
                result = self._break_tie(parts, entry)
                if result.image_id is not None or ref.numeric_id is None:
                    return result
        if ref.numeric_id is not None:
            number = self._by_number.get(int(ref.numeric_id), "")
            if number is None:
                return MatchResult(
                    None, "ambiguous", [f"several images end with the number {ref.numeric_id}"]
                )
            if number:
                return MatchResult(number)
        return MatchResult(None, "missing")

    @staticmethod
    def _break_tie(parts: list[str], group: list[tuple[str, list[str]]]) -> MatchResult:
        """Among images sharing a stem, the unique one with the longest common trailing path."""

        def shared(candidate: list[str]) -> int:
            n = 0
            while n < min(len(parts), len(candidate)) and parts[-1 - n] == candidate[-1 - n]:
                n += 1
            return n

        scores = [(shared(p), image_id) for image_id, p in group]
        best = max(s for s, _ in scores)
        winners = [image_id for s, image_id in scores if s == best]
        if len(winners) == 1:
            return MatchResult(winners[0])
        return MatchResult(None, "ambiguous", sorted(winners))
