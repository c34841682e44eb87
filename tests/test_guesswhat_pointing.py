"""GuessWhat?! guesser: reader (guesswhat.*.jsonl games), shard with the objects' boxes through the detector's
given-box mode (tiny random weights), batches with a varying number of candidates, training, eval, the metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import make_image, read_task_samples, write_feature_set, write_vocab

from pipelines.annotations import AnnotationError, ImageRef
from pipelines.annotations.common import Annotation
from pipelines.datasets import TaskDataset
from pipelines.formats.npy import load_npy
from pipelines.shard_job import run_shard
from pipelines.tasks.guesswhat_pointing import TASK, read_guesswhat
from pipelines.tokenization import TextTokenizer
from vilbert_core.evaluation.evaluator import run_eval
from vilbert_core.training.trainer import run_train

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["is", "it", "a", "cup", "on", "the", "right", "yes", "no", "person", "n", "/"]
# object id -> COCO bbox [x, y, w, h] in a 64 x 48 image
OBJECTS = {5001: [2, 4, 20, 10], 5002: [30, 5, 10, 10], 5003: [10, 20, 15, 20], 5004: [40, 30, 8, 8],
           6001: [1, 1, 30, 30], 6002: [20, 10, 20, 20]}  # fmt: skip
FOLDER = {201: "train2014", 202: "val2014"}  # COCO's two folders under one --images root
# (game id, image id, object ids, target, status, qas)
GAMES = [
    (1, 201, [5003, 5001, 5002], 5002, "success", [("is it a cup?", "No"), ("is it on the right?", "Yes")]),
    (2, 201, [5001, 5002, 5003], 5001, "failure", [("is it a person?", "No")]),
    (3, 201, [5001, 5002, 5003, 5004], 5004, "success", [("is it a cup?", "Yes")]),
    (4, 202, [6002, 6001], 6001, "success", [("is it a person?", "N/A")]),
    (5, 202, [6001, 6002], 6002, "incomplete", []),
]  # fmt: skip
# by hand: the objects sorted by id, the target's place among them, the dialogue
EXPECTED = {1: ([5001, 5002, 5003], 1, "is it a cup? No is it on the right? Yes"),
            3: ([5001, 5002, 5003, 5004], 3, "is it a cup? Yes"), 4: ([6001, 6002], 0, "is it a person? N/A")}  # fmt: skip


def file_name(image: int) -> str:
    """The COCO file name of an image id."""
    return f"COCO_{FOLDER[image]}_{image:012d}.jpg"


def corners(obj: int) -> list[float]:
    """The xyxy corners of an object's COCO bbox."""
    x, y, w, h = OBJECTS[obj]
    return [x, y, x + w, y + h]


def game_line(game: tuple) -> str:
    """One game in the guesswhat.*.jsonl layout."""
    gid, image, objects, target, status, qas = game
    return json.dumps({
        "id": gid, "status": status, "object_id": target, "picture": None,
        "image": {"id": image, "file_name": file_name(image), "width": 64, "height": 48, "coco_url": "x"},
        "qas": [{"question": q, "answer": a, "id": 100 * gid + k} for k, (q, a) in enumerate(qas)],
        "objects": [{"id": o, "category": "thing", "category_id": 1, "bbox": OBJECTS[o], "area": 1.0, "segment": []}
                    for o in objects]})  # fmt: skip


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> dict:
    """Images (in train2014/ and val2014/), their feature set, the games sharded with a random detector, a vocab."""
    extract = pytest.importorskip("extract")
    root = tmp_path_factory.mktemp("gw")
    feats = []
    for k, image in enumerate(FOLDER):
        (root / "coco" / FOLDER[image]).mkdir(parents=True)
        pixels = np.random.default_rng(k).integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "coco" / FOLDER[image] / file_name(image))
        stem = file_name(image)[:-4]
        feats.append(make_image(stem, f"{FOLDER[image]}/{file_name(image)}", k=3, dim=1024, seed=k, w=64, h=48))
    fs = write_feature_set(root / "feats", feats)
    games = root / "guesswhat.train.jsonl"
    games.write_text("".join(game_line(g) + "\n" for g in GAMES))
    cfg = extract.DetectorConfig(depth=50, min_size=48, max_size=64)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        info = run_shard(fs, "guesswhat_pointing", [games], "train", root / "train", shard_size=1,
                         images=root / "coco", detector_config=cfg, device="cpu", progress=False)  # fmt: skip
    return {"root": root, "games": games, "train": root / "train", "info": info, "feats": feats,
            "vocab": write_vocab(root / "vocab.txt", WORDS)}  # fmt: skip


def test_reader_keeps_successful_games_with_their_objects(gw: dict) -> None:
    anns = read_guesswhat([gw["games"]], gw["root"] / "coco")
    assert [a.record["game_id"] for a in anns] == [1, 3, 4]
    for a in anns:
        ids, label, text = EXPECTED[a.record["game_id"]]
        assert (a.record["candidate_ids"], a.record["label"], a.record["dialogue"]) == (ids, label, text)
        assert a.record["candidate_boxes"] == [corners(o) for o in ids]
    # the image is found in its COCO folder under the --images root
    assert anns[2].extra["image"] == str(gw["root"] / "coco" / "val2014" / file_name(202))
    assert anns[2].ref.path == file_name(202) and anns[2].ref.numeric_id == 202
    assert anns[0].extra["games_left_out"] == {"failure": 1, "incomplete": 1}


def test_bad_games_name_the_file_and_line(tmp_path: Path) -> None:
    bad_target = (9, 201, [5001], 5002, "success", [])
    path = tmp_path / "guesswhat.valid.jsonl"
    path.write_text(game_line(GAMES[0]) + "\n" + game_line(bad_target) + "\n")
    with pytest.raises(AnnotationError, match=r"valid\.jsonl: line 2 \(game 9\): object_id 5002 is not one of"):
        read_guesswhat([path], tmp_path)
    path.write_text(game_line(GAMES[0]).replace("[2, 4, 20, 10]", "[2, 4]") + "\n")
    with pytest.raises(AnnotationError, match=r"line 1 \(game 1\): objects\[1\]: bbox needs 4 numbers"):
        read_guesswhat([path], tmp_path)
    path.write_text('{"id": 1}\n')
    with pytest.raises(AnnotationError, match=r"line 1: missing field\(s\) image, qas, objects, object_id, status"):
        read_guesswhat([path], tmp_path)


def test_shard_and_batches_with_a_varying_number_of_candidates(gw: dict) -> None:
    counts = gw["info"]["counts"]
    assert counts["records"] == 3 and counts["failed"] == 0
    assert counts["games_left_out_by_status"] == {"failure": 1, "incomplete": 1}
    assert counts["max_candidate_boxes_per_image"] == 4 and counts["candidates_per_record"] == [2, 3, 4]
    samples = read_task_samples(gw["train"])
    a, b = (file_name(i)[:-4] for i in FOLDER)
    np.testing.assert_allclose(load_npy(samples[a]["gt_boxes.npy"]), [corners(o) for o in range(5001, 5005)])
    np.testing.assert_allclose(load_npy(samples[b]["gt_boxes.npy"]), [corners(o) for o in (6001, 6002)])
    assert [r["candidates"] for r in json.loads(samples[a]["ann.json"])] == [[0, 1, 2], [0, 1, 2, 3]]

    tok = TextTokenizer.from_pretrained(gw["vocab"], max_len=32)
    batch = next(iter(TaskDataset(gw["train"], "guesswhat_pointing", tok, batch_size=3, shuffle_buffer=1)))
    assert batch["record_id"] == [1, 3, 4]
    assert batch["candidate_regions"].tolist() == [[1, 2, 3, 0], [1, 2, 3, 4], [1, 2, 0, 0]]
    assert batch["candidate_mask"].tolist() == [[True] * 3 + [False], [True] * 4, [True] * 2 + [False] * 2]
    assert batch["label"].tolist() == [1, 3, 0]
    # game 4 (image 202): regions 1, 2 are its objects' given-box features, then its 3 detected regions
    feats = batch["image_feat"][2].numpy()
    np.testing.assert_array_equal(feats[1:3], load_npy(samples[b]["gt_features.npy"]).astype(np.float32))
    np.testing.assert_array_equal(feats[3:6], gw["feats"][1].features.astype(np.float32))
    # the dialogue is the text: [CLS] is it a person ? n / a [SEP] (vocab: words from 5, then . ? ,)
    w = {t: 5 + i for i, t in enumerate([*WORDS, ".", "?"])}
    want = [2, *(w[t] for t in "is it a person ? n / a".split()), 3]
    assert batch["input_ids"][2, : len(want)].tolist() == want


def test_train_a_few_steps_then_eval(gw: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_train(task="guesswhat_pointing", data=str(gw["train"]), out=str(run), vocab=str(gw["vocab"]),
                        config="tiny", steps=3, batch_size=3, lr=1e-3, warmup=0.0, num_workers=0, progress=False,
                        device="cpu", max_text_len=32)  # fmt: skip
    assert summary["steps"] == 3 and np.isfinite(summary["last"]["loss"])
    res = run_eval("guesswhat_pointing", run, gw["train"], tmp_path / "report", batch_size=2, device="cpu",
                   progress=False)  # fmt: skip
    split = res["splits"]["train"]
    preds = json.loads((tmp_path / "report" / "guesswhat_pointing_predictions_train.json").read_text())
    assert sorted(preds) == ["1", "3", "4"] and split["num_records"] == 3
    for gid, p in preds.items():
        ids, label, _ = EXPECTED[int(gid)]
        assert p["answer_box_id"] == ids[label] and len(p["probs"]) == len(ids)
        assert p["box_id"] == ids[int(np.argmax(p["probs"]))] and p["correct"] == (p["box_id"] == ids[label])
    assert split["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in preds.values()) / 3)
    # a random object: (1/3 + 1/4 + 1/2) / 3
    assert split["baselines"]["chance"]["accuracy"] == pytest.approx(100 * (1 / 3 + 1 / 4 + 1 / 2) / 3)
    assert "shuffled_images" in split


def test_candidates_beyond_max_regions_stop_with_the_fix(gw: dict) -> None:
    tok = TextTokenizer.from_pretrained(gw["vocab"], max_len=32)
    ds = TaskDataset(gw["train"], "guesswhat_pointing", tok, batch_size=3, shuffle_buffer=1, max_regions=3)
    # game 3's fourth object is the image's fourth given box: only 3 regions are kept
    with pytest.raises(ValueError, match=r"game_id 3: candidate box 4 of the image is not among the 3 regions kept; "
                                         r"raise --max-regions to at least 4"):  # fmt: skip
        next(iter(ds))
    many = [Annotation(ImageRef(path="x.jpg"), {"candidate_ids": list(range(k, k + 20))}) for k in (0, 20)]
    counts, warnings = TASK.shard_report(many, gw["root"])
    assert counts["max_candidate_boxes_per_image"] == 40 and counts["candidates_per_record"] == [20]
    assert len(warnings) == 1 and "--max-regions 40" in warnings[0]
