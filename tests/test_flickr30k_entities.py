"""Flickr30k Entities grounding: reader (Sentences/*.txt + Annotations/*.xml + split lists), IoU targets by
hand under both protocols, dataset batches, a few training steps, and accuracy at IoU 0.5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError
from pipelines.datasets import TaskDataset
from pipelines.shard_job import run_shard
from pipelines.tasks.flickr30k_entities import parse_sentence, read_flickr_entities
from pipelines.tokenization import TextTokenizer
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.tasks.flickr30k_entities import grounding_accuracy
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = "1000092795", "10002456"
WORDS = ["a", "man", "in", "hat", "walks", "past", "two", "dogs", "someone", "stands", "the", "street", "nobody",
         "is", "there", "woman", "rides", "bike"]  # fmt: skip
DETECTED = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 20, 20]], np.float32)  # image A
SENTENCES = {
    A: ["[/EN#1/people A man] in [/EN#3/clothing a hat] walks past [/EN#2/animals two dogs] .",
        "[/EN#5/people/other Someone] stands in [/EN#4/scene the street] .",
        "[/EN#0/notvisual Nobody] is [/EN#6/bodyparts there] ."],
    B: ["[/EN#7/people A woman] rides [/EN#8/vehicles a bike] ."],
}  # fmt: skip
# (entity names, xml box 1-based, or None for <nobndbox>): entity 2 has two boxes, 5 and 6 share one
OBJECTS = {
    A: [(["1"], (1, 1, 11, 11)), (["2"], (21, 21, 31, 31)), (["2"], (1, 1, 6, 6)), (["3"], None), (["4"], None),
        (["5", "6"], (6, 6, 16, 16))],
    B: [(["7"], (11, 11, 41, 61)), (["8"], (31, 41, 91, 79))],
}  # fmt: skip
# By hand, IoU of DETECTED with the phrase's boxes (0-based: [0,0,10,10]; [20,20,30,30] + [0,0,5,5]; [5,5,15,15])
ANY_BOX = {"A man": [1.0, 25 / 175, 0.0, 100 / 400], "two dogs": [25 / 100, 0.0, 1.0, 25 / 400],
           "Someone": [25 / 175, 1.0, 0.0, 100 / 400], "there": [25 / 175, 1.0, 0.0, 100 / 400]}  # fmt: skip
# two dogs merged: [0,0,30,30] (area 900) holds every detected box
MERGED = {**ANY_BOX, "two dogs": [100 / 900, 100 / 900, 100 / 900, 400 / 900]}


def xml(image: str, objects: list) -> str:
    """An Annotations/<image>.xml in the release's PASCAL-VOC-like layout."""
    parts = [f"<annotation><filename>{image}.jpg</filename><size><width>100</width><height>80</height>"
             "<depth>3</depth></size>"]  # fmt: skip
    for names, box in objects:
        inner = "".join(f"<name>{n}</name>" for n in names)
        if box is None:
            inner += "<nobndbox>1</nobndbox><scene>1</scene>" if names == ["4"] else "<nobndbox>1</nobndbox>"
        else:
            inner += "<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box,
                                                                              strict=True)) + "</bndbox>"  # fmt: skip
        parts.append(f"<object>{inner}</object>")
    return "".join(parts) + "</annotation>"


def write_release(root: Path) -> Path:
    """Sentences/, Annotations/ and the split lists train.txt (both images) and test.txt (image B)."""
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for image, lines in SENTENCES.items():
        (root / "Sentences" / f"{image}.txt").write_text("\n".join(lines) + "\n")
        (root / "Annotations" / f"{image}.xml").write_text(xml(image, OBJECTS[image]))
    (root / "train.txt").write_text(f"{A}\n{B}\n")
    (root / "test.txt").write_text(f"{B}\n")
    return root


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> dict[str, Path]:
    """Features of both images (A with hand-made boxes), the train split sharded, a vocab."""
    root = tmp_path_factory.mktemp("flickr")
    release = write_release(root / "flickr30k_entities")
    a = make_image(A, f"flickr30k-images/{A}.jpg", k=4, dim=16, seed=0)
    a.boxes = DETECTED
    b = make_image(B, f"flickr30k-images/{B}.jpg", k=5, dim=16, seed=1)
    feats = write_feature_set(root / "feats", [a, b])
    train = root / "train"
    run_shard(feats, "flickr30k_entities", [release / "train.txt"], "train", train, shard_size=1, progress=False)
    return {"feats": feats, "train": train, "release": release, "vocab": write_vocab(root / "vocab.txt", WORDS)}


def test_sentence_markup() -> None:
    sentence, phrases = parse_sentence(SENTENCES[A][0])
    assert sentence == "A man in a hat walks past two dogs ."
    assert [(p["entity_id"], p["types"], p["phrase"], p["first_word_index"]) for p in phrases] == [
        ("1", ["people"], "A man", 0), ("3", ["clothing"], "a hat", 3), ("2", ["animals"], "two dogs", 7)]
    assert parse_sentence(SENTENCES[A][1])[1][0]["types"] == ["people", "other"]


def test_reader_keeps_phrases_with_boxes(flickr: dict[str, Path]) -> None:
    anns = read_flickr_entities([flickr["release"] / "train.txt"])
    got = [(a.ref.path, a.record["phrase"], a.record["phrase_type"], a.record["gt_boxes"]) for a in anns]
    assert got == [
        (f"{A}.jpg", "A man", "people", [[0, 0, 10, 10]]),
        (f"{A}.jpg", "two dogs", "animals", [[20, 20, 30, 30], [0, 0, 5, 5]]),
        (f"{A}.jpg", "Someone", "people", [[5, 5, 15, 15]]),
        (f"{A}.jpg", "there", "bodyparts", [[5, 5, 15, 15]]),
        (f"{B}.jpg", "A woman", "people", [[10, 10, 40, 60]]),
        (f"{B}.jpg", "a bike", "vehicles", [[30, 40, 90, 78]]),
    ]
    assert anns[1].record["phrase_id"] == f"{A}_0_7" and anns[1].record["sentence"].startswith("A man in a hat")
    assert sum(a.extra["phrases_without_boxes"] for a in anns) == 3  # a hat, the street, Nobody
    assert [a.record["phrase"] for a in read_flickr_entities([flickr["release"] / "test.txt"])] == ["A woman", "a bike"]
    assert len(read_flickr_entities([flickr["release"]])) == 6  # the folder: every image


def test_bad_files_name_the_file_and_line(tmp_path: Path) -> None:
    release = write_release(tmp_path / "r")
    (release / "Sentences" / f"{B}.txt").write_text("fine .\n[/EN#7/people A woman rides .\n")
    with pytest.raises(AnnotationError, match=rf"{B}\.txt: line 2: unbalanced or malformed phrase marker"):
        read_flickr_entities([release / "test.txt"])
    (release / "Sentences" / f"{B}.txt").write_text(SENTENCES[B][0])
    (release / "Annotations" / f"{B}.xml").write_text(xml(B, [(["7"], (1, 1, 5, 5))]).replace("<ymax>5", "<ymax>x"))
    with pytest.raises(AnnotationError, match=rf"{B}\.xml: object 0 \(7\): bndbox needs numeric"):
        read_flickr_entities([release / "test.txt"])
    with pytest.raises(AnnotationError, match="expected a Flickr30k Entities split list"):
        read_flickr_entities([tmp_path / "elsewhere.txt"])


def test_shard_stores_both_ious_and_batches_zero_targets_below_half(flickr: dict[str, Path]) -> None:
    info = json.loads((flickr["train"] / "task.json").read_text())
    assert info["task"] == "flickr30k_entities" and info["counts"]["records"] == 6
    assert info["counts"]["phrases_without_boxes"] == 3
    records = {r["phrase"]: r for r in json.loads(read_task_samples(flickr["train"])[A]["ann.json"])}
    for phrase, expected in ANY_BOX.items():
        np.testing.assert_allclose(records[phrase]["iou"], expected, atol=1e-6)
        np.testing.assert_allclose(records[phrase]["iou_merged"], MERGED[phrase], atol=1e-6)
    tok = TextTokenizer.from_pretrained(flickr["vocab"], max_len=24)
    ds = TaskDataset(flickr["train"], "flickr30k_entities", tok, batch_size=6, shuffle_buffer=1)
    batch = next(iter(ds))
    rows = {p: i for i, p in enumerate(batch["phrase_id"])}
    row = rows[f"{A}_0_7"]  # two dogs
    np.testing.assert_allclose(batch["region_iou"][row, :5].numpy(), [0.0, *ANY_BOX["two dogs"]], atol=1e-6)
    np.testing.assert_allclose(batch["region_target"][row, :5].numpy(), [0.0, 0.0, 0.0, 1.0, 0.0], atol=1e-6)
    # the text is the pair (phrase, sentence): the sentence's tokens are segment 1
    assert 1 in batch["token_type_ids"][row].tolist()


def test_metric_against_a_hand_worked_example() -> None:
    preds = [{"phrase_type": "people", "correct": True, "correct_merged": True},
             {"phrase_type": "people", "correct": False, "correct_merged": False},
             {"phrase_type": "animals", "correct": True, "correct_merged": False},
             {"phrase_type": "scene", "correct": False, "correct_merged": True}]  # fmt: skip
    got = grounding_accuracy(preds)
    assert got == {"accuracy": 50.0, "accuracy_merged_boxes": 50.0, "num_phrases": 4,
                   "per_phrase_type": {"animals": 100.0, "people": 50.0, "scene": 0.0}}  # fmt: skip


def test_train_a_few_steps_then_eval(flickr: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="flickr30k_entities", data=str(flickr["train"]), out=str(run), vocab=str(flickr["vocab"]),
                        config="tiny", steps=3, batch_size=4, lr=1e-3, warmup=0.0, num_workers=0, progress=False,
                        device="cpu", max_text_len=24)  # fmt: skip
    assert summary["steps"] == 3
    res = run_eval("flickr30k_entities", run, flickr["train"], tmp_path / "report", batch_size=4, device="cpu",
                   progress=False)  # fmt: skip
    split = res["splits"]["train"]
    preds = json.loads((tmp_path / "report" / "flickr30k_entities_predictions_train.json").read_text())
    assert len(preds) == 6 == split["num_phrases"]
    phrase_of = {f"{A}_0_0": "A man", f"{A}_0_7": "two dogs", f"{A}_1_0": "Someone", f"{A}_2_2": "there"}
    for p in preds:
        if p["phrase_id"] in phrase_of:  # image A: the hand-computed IoU of the region it pointed at
            phrase = phrase_of[p["phrase_id"]]
            assert p["iou"] == pytest.approx(ANY_BOX[phrase][p["region"]], abs=1e-6)
            assert p["correct"] == (ANY_BOX[phrase][p["region"]] >= 0.5)
    assert split["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in preds) / 6)
    assert "shuffled_images" in split and "chance" in split["baselines"]
