"""GuessWhat?! guesser (`guesswhat.{train,valid,test}.jsonl`): one example per successful game; pick the target object.

A game: {"id", "image": {"id", "file_name", "width", "height", ...}, "qas": [{"question", "answer",
"id"}], "objects": [{"id", "category", "category_id", "bbox": [x, y, w, h] (COCO), ...}],
"object_id" (the target), "status"}. Only games with status "success" make an example: in the
others the questioner's guess was wrong ("failure") or it never guessed ("incomplete"), so the
dialogue need not single out the target (the guesser protocol of de Vries et al. 2017); `shard`
counts the games left out by status. The text is the dialogue, every question followed by its
answer, joined with spaces ("is it a person? Yes is it on the left? No"); the candidates are the
game's objects, sorted by object id, their COCO boxes through the detector's given-box mode (see
`_pointing.py`). `--split` is only recorded (the files are per split); `--images` is the COCO images
folder (or its parent holding train2014/ and val2014/).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.annotations.common import Annotation, ImageRef, bad, read_jsonl, require
from pipelines.tasks._pointing import PointingDataTask, image_path


def dialogue(qas: Sequence[dict[str, Any]]) -> str:
    """A game's questions and answers as one text, each question followed by its answer."""
    return " ".join(f"{qa['question']} {qa['answer']}" for qa in qas)


def read_guesswhat(paths: Sequence[Path], images_dir: str | Path | None) -> list[Annotation]:
    """One annotation per successful game, in file and line order; the others counted by status on the first."""
    out: list[Annotation] = []
    left_out: Counter[str] = Counter()
    cache: dict[str, str] = {}
    for path in paths:
        for lineno, game in read_jsonl(path):
            where = f"line {lineno}"
            require(path, where, game, ("id", "image", "qas", "objects", "object_id", "status"))
            where = f"line {lineno} (game {game['id']})"
            require(path, where, game["image"], ("id", "file_name"))
            if game["status"] != "success":
                left_out[str(game["status"])] += 1
                continue
            boxes: dict[int, list[float]] = {}
            for k, obj in enumerate(game["objects"]):
                require(path, f"{where}: objects[{k}]", obj, ("id", "bbox"))
                try:
                    x, y, w, h = (float(v) for v in obj["bbox"])
                except (TypeError, ValueError):
                    raise bad(path, f"{where}: objects[{k}]", "bbox needs 4 numbers [x, y, w, h]") from None
                boxes[obj["id"]] = [x, y, x + w, y + h]
            if game["object_id"] not in boxes:
                raise bad(path, where, f"object_id {game['object_id']} is not one of its objects")
            for k, qa in enumerate(game["qas"]):
                require(path, f"{where}: qas[{k}]", qa, ("question", "answer"))
            ids = sorted(boxes)
            image = game["image"]
            record = {"game_id": game["id"], "dialogue": dialogue(game["qas"]), "object_id": game["object_id"],
                      "candidate_ids": ids, "candidate_boxes": [boxes[b] for b in ids],
                      "label": ids.index(game["object_id"])}  # fmt: skip
            extra = {"image": image_path(images_dir, image["file_name"], "guesswhat_pointing", cache)}
            out.append(Annotation(ImageRef(path=image["file_name"], numeric_id=int(image["id"])), record, extra))
    if out:
        out[0].extra = {**out[0].extra, "games_left_out": dict(sorted(left_out.items()))}
    return out


class GuessWhatPointingTask(PointingDataTask):
    """GuessWhat?! guesser: which of the game's objects the dialogue is about."""

    name = "guesswhat_pointing"
    id_key = "game_id"

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The successful games of the given jsonl files."""
        return read_guesswhat(paths, images_dir)

    def shard_report(self, anns: Sequence[Annotation], report_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """The candidate counts, and the games left out by status."""
        counts, warnings = super().shard_report(anns, report_dir)
        left_out: Counter[str] = Counter()
        for a in anns:
            left_out.update(a.extra.get("games_left_out", {}))
        return {**counts, "games_left_out_by_status": dict(sorted(left_out.items()))}, warnings

    def text(self, record: dict[str, Any]) -> str:
        """The dialogue."""
        return record["dialogue"]


TASK = GuessWhatPointingTask()
