"""GuessWhat?! answers (the oracle): yes, no or not applicable to a question about a COCO image.

The official layout (`guesswhat.{train,valid,test}.jsonl`, one game a line): `{"id": 2418, "image":
{"file_name": "COCO_train2014_000000516212.jpg", "id": 516212, ...}, "qas": [{"question": "is it a
person?", "answer": "No", "id": 4988}, ...], "objects": [...], "object_id": ..., "status": "success"}`.
One example per question, of every game whatever its status; answers "Yes", "No", "N/A".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.annotations.common import Annotation, ImageRef, bad, read_jsonl, require
from pipelines.tasks.snli_ve import LabelDataTask

GUESSWHAT_ANSWERS = ("Yes", "No", "N/A")  # label 0, 1, 2


def read_guesswhat(paths: Sequence[Path]) -> list[Annotation]:
    """Questions of GuessWhat?! game files, in file, game and question order."""
    out: list[Annotation] = []
    for path in paths:
        for lineno, game in read_jsonl(path):
            where = f"line {lineno}"
            require(path, where, game, ["id", "image", "qas"])
            require(path, f"{where}: image", game["image"], ["file_name"])
            if not isinstance(game["qas"], list):
                raise bad(path, where, "qas must be a list")
            image = game["image"]
            ref = ImageRef(path=image["file_name"], numeric_id=image.get("id"))
            for n, qa in enumerate(game["qas"]):
                require(path, f"{where}: qas[{n}]", qa, ["question", "id"])
                answer = qa.get("answer")
                if answer is not None and answer not in GUESSWHAT_ANSWERS:
                    raise bad(path, f"{where}: qas[{n}]",
                              f"answer {answer!r} must be one of {', '.join(GUESSWHAT_ANSWERS)}")  # fmt: skip
                record = {"question_id": int(qa["id"]), "question": qa["question"], "game_id": int(game["id"]),
                          "status": game.get("status", ""),
                          "label": -1 if answer is None else GUESSWHAT_ANSWERS.index(answer)}  # fmt: skip
                out.append(Annotation(ref, record))
    return out


class GuessWhatTask(LabelDataTask):
    """Yes / no / not applicable answers to questions about one object of the image."""

    name = "guesswhat"
    text_field = "question"
    id_field = "question_id"
    list_fields = ("question", "game_id")

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """Every question of the given GuessWhat?! game files (the split name is only recorded)."""
        return read_guesswhat(paths)


TASK = GuessWhatTask()
