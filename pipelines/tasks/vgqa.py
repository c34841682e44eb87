"""Visual Genome QA: `question_answers.json`, one answer per question, an answer list from the training answers.

The official layout is one JSON list over images: `[{"id": image_id, "qas": [{"qa_id", "image_id",
"question", "answer", "a_objects", "q_objects"}, ...]}, ...]` (images without questions have
`"qas": []`). Images are `<image_id>.jpg` (in VG_100K/ or VG_100K_2/).

Answers are normalised once, here, and the metric compares the normalised forms exactly:
lower case, surrounding whitespace and trailing full stops dropped, inner whitespace collapsed
("A red shirt. " -> "a red shirt"). Nothing else (articles, number words) is touched.

Visual Genome ships no split: `--split` selects images by id, so no image is in two splits:
`val` = id % 10 == 1, `test` = id % 10 == 0, `train` = the rest (80/10/10), `all` = every question.
Everything else (one-hot targets, examples, batches, the answer head) is GQA's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipelines.annotations.common import Annotation, AnnotationError, ImageRef, bad, load_json, require
from pipelines.tasks.gqa import GQATask

VG_SPLITS = ("train", "val", "test", "all")
WH_WORDS = ("what", "where", "when", "who", "why", "how")  # VG QA's six question types


def normalize_vg_answer(answer: str) -> str:
    """The compared form of a VG answer: lower case, no trailing full stops, single spaces."""
    return " ".join(answer.lower().strip().rstrip(".").split())


def vg_question_type(question: str) -> str:
    """The question's W-word (what, where, when, who, why, how), else "other"."""
    words = question.lower().split()
    first = words[0].strip("?,.!") if words else ""
    return first if first in WH_WORDS else "other"


def vg_split_of(image_id: int) -> str:
    """The split an image belongs to (by its id's last digit)."""
    return {0: "test", 1: "val"}.get(image_id % 10, "train")


def read_vg_qa(paths: Sequence[Path], split: str) -> list[Annotation]:
    """Questions of VG question_answers.json files for one split, in file, image and qa_id order."""
    if split not in VG_SPLITS:
        raise AnnotationError(f"--split {split!r}: Visual Genome QA splits are {', '.join(VG_SPLITS)}")
    out: list[Annotation] = []
    for path in paths:
        data = load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(f"{path}: expected VG question_answers.json (a list of {{'id', 'qas'}})")
        rows = []
        for i, image in enumerate(data):
            require(path, f"image [{i}]", image, ["id", "qas"])
            if not isinstance(image["qas"], list):
                raise bad(path, f"image {image['id']}", "qas must be a list")
            for qa in image["qas"]:
                where = f"image {image['id']} qa {qa.get('qa_id') if isinstance(qa, dict) else qa!r}"
                require(path, where, qa, ["qa_id", "question", "answer"])
                if not isinstance(qa["answer"], str) or not isinstance(qa["question"], str):
                    raise bad(path, where, "question and answer must be strings")
                rows.append((int(image["id"]), int(qa["qa_id"]), qa))
        for image_id, qa_id, qa in sorted(rows, key=lambda r: r[:2]):
            if split != "all" and vg_split_of(image_id) != split:
                continue
            record = {"question_id": qa_id, "question": qa["question"].strip(),
                      "answers": [normalize_vg_answer(qa["answer"])],
                      "question_type": vg_question_type(qa["question"])}  # fmt: skip
            out.append(Annotation(ImageRef(path=f"{image_id}.jpg", numeric_id=image_id), record))
    return out


class VGQATask(GQATask):
    """Visual Genome's free-form questions, scored by exact match of the normalised answer."""

    name = "vgqa"
    split_selects_records = True
    list_fields = ("answers", "question_type", "question")

    def read(self, paths: Sequence[Path], split: str, images_dir: str | Path | None) -> list[Annotation]:
        """The split's questions (by image id) of the given question_answers.json files."""
        return read_vg_qa(paths, split)


TASK = VGQATask()
