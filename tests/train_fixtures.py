"""Helpers shared by the training tests: a small feature set, caption and VQA annotation files, task shards."""

from __future__ import annotations

import json
from pathlib import Path

from shard_fixtures import make_image, write_feature_set, write_vocab

from pipelines.shard_job import run_shard

WORDS = ["a", "dog", "runs", "brown", "two", "cats", "sit", "red", "car", "on", "the", "road", "what", "color", "is"]
SRC = "train2014/COCO_train2014_{:012d}.jpg"
DIM = 16


def feature_set(root: Path, n: int, per_shard: int = 4) -> Path:
    """n images with 4-6 regions of DIM-d features, named as COCO train images (numeric ids 0..n-1)."""
    images = [make_image(f"img{i}", SRC.format(i), k=4 + i % 3, dim=DIM, seed=i) for i in range(n)]
    return write_feature_set(root, images, per_shard=per_shard)


def vqa_files(root: Path, qs: list[tuple[int, int, str, str]], answers_per_question: int = 10) -> list[Path]:
    """VQA v2 questions + annotations files for (question id, image id, question, answer) rows.

    Of each question's answers, the first 8 are its answer and the rest "blue".
    """
    questions = {"questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t, _ in qs]}
    anns = {"annotations": [
        {"question_id": q, "image_id": i, "question_type": "what", "answer_type": "other", "multiple_choice_answer": a,
         "answers": [{"answer": a if k < 8 else "blue", "answer_confidence": "yes", "answer_id": k + 1}
                     for k in range(answers_per_question)]}
        for q, i, _, a in qs]}  # fmt: skip
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(anns))
    return [root / "q.json", root / "a.json"]


def build_train_data(root: Path) -> dict[str, Path]:
    """Captions and VQA task shards over 8 images with 16-d features, and a vocab.txt."""
    feats = feature_set(root / "feats", 8)
    phrases = ["a dog runs", "two cats sit", "a red car", "the brown dog", "a car on the road", "red cats"]
    caps = [(i, phrases[(i + j) % len(phrases)]) for i in range(8) for j in range(2)]
    coco = root / "captions.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": i, "file_name": SRC.format(i)} for i in range(8)],
                "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(caps)],
            }
        )
    )
    captions = root / "captions_train"
    run_shard(feats, "captions", [coco], "train", captions, shard_size=2, progress=False)
    pairs = [(i, q, a) for i in range(1, 8) for q, a in (("what color is the car", "red"), ("is it a dog", "yes"))]
    qs = [(100 + n, i, q, a) for n, (i, q, a) in enumerate(pairs)]
    vqa = root / "vqa_train"
    run_shard(feats, "vqa", vqa_files(root, qs), "train", vqa, shard_size=3, min_answer_count=1, progress=False)
    vocab = write_vocab(root / "vocab.txt", WORDS)
    return {"feats": feats, "captions": captions, "vqa": vqa, "vocab": vocab, "root": root}
