"""`vilbert-data shard` and `vilbert-data vocab` through the command line."""

from __future__ import annotations

import json

from shard_fixtures import make_image, read_task_samples, write_feature_set
from typer.testing import CliRunner

from cli import app
from pipelines.tokenization import TextTokenizer


def test_shard_command_with_several_files_and_report(tmp_path) -> None:
    images = [make_image(f"photo_{i}", f"photos/photo_{i}.jpg", k=2, dim=4, seed=i) for i in range(3)]
    root = write_feature_set(tmp_path / "f", images)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"image": "photo_0.jpg", "caption": "one"}) + "\n")
    b.write_text(
        json.dumps({"image": "photo_1.jpg", "caption": "two"})
        + "\n"
        + json.dumps({"image": "nope.jpg", "caption": "x"})
        + "\n"
    )
    args = ["shard", "--features", str(root), "--task", "captions", "--annotations", str(a), str(b),
            "--split", "train", "--out", str(tmp_path / "t"), "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "2 images, 2 records in 1 shard(s)" in res.output
    assert "annotations without features: 1" in res.output and "images without annotations: 1" in res.output
    assert sorted(read_task_samples(tmp_path / "t")) == ["photo_0", "photo_1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "photo_0.jpg"}\n')
    res = CliRunner().invoke(app, [*args[:6], str(bad), *args[7:]])
    assert res.exit_code == 2 and "bad.jsonl: line 1: missing field(s) caption" in res.output


def test_vocab_command_trains_a_loadable_wordpiece_vocabulary(tmp_path) -> None:
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": "A zebra grazing near a giraffe."}) + "\n"
                            for i in range(5)))  # fmt: skip
    (tmp_path / "more.txt").write_text("the zebra runs\n" * 3)
    res = CliRunner().invoke(app, ["vocab", str(caps), str(tmp_path / "more.txt"), "--out", str(tmp_path / "v"),
                                   "--vocab-size", "200", "--min-frequency", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "v/vocab.txt").read_text().split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {"zebra", "giraffe", "grazing"} <= set(lines)  # frequent words become whole tokens
    for path in (tmp_path / "v/vocab.txt", tmp_path / "v"):  # both a vocab.txt and the tokenizer folder load
        tok = TextTokenizer.from_pretrained(path)
        ids, _ = tok.encode("ZEBRA near Giraffe")  # uncased
        assert ids == [2, lines.index("zebra"), lines.index("near"), lines.index("giraffe"), 3]
