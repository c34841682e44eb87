"""`run_explain`: the picture is a valid PNG of the requested size; heads' numbers are the known ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from eval_fixtures import D, npy, tiny, write_run
from PIL import Image

from vilbert_core import ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.evaluation.explain import merge_word_pieces, run_explain
from vilbert_core.evaluation.loading import EvalError

K = 6
WORDS = ["a", "dog", "on", "the", "grass", "red", "cat", "man", "yes", "no", "##s", "run", "##ning"]


def write_feature_set(root: Path, images: dict[str, Path]) -> Path:
    """A feature set in the extract format (contract s.2): tar + parquet index, one sample per image."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    with wds.TarWriter(str(root / "features-000000.tar")) as sink:
        for image_id, src in images.items():
            w, h = Image.open(src).size
            x1, y1 = rng.uniform(0, w / 2, K), rng.uniform(0, h / 2, K)
            boxes = np.stack([x1, y1, x1 + w / 3, y1 + h / 3], 1).astype(np.float32)
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h))[:, None]
            spatial = np.concatenate([boxes / [w, h, w, h], area], 1).astype(np.float32)
            meta = {"image_id": image_id, "source": str(src), "width": w, "height": h, "num_boxes": K,
                    "feature_layer": "res4"}  # fmt: skip
            sink.write(
                {
                    "__key__": image_id,
                    "boxes.npy": npy(boxes),
                    "features.npy": npy(rng.uniform(0, 2, (K, D)).astype(np.float16)),
                    "spatial.npy": npy(spatial),
                    "cls_prob.npy": npy(rng.dirichlet(np.ones(1601), K).astype(np.float16)),
                    "objects.npy": npy(np.ones((K, 2), np.float32)),
                    "attributes.npy": npy(np.ones((K, 2), np.float32)),
                    "json": json.dumps(meta),
                }
            )
            rows.append({"image_id": image_id, "source": str(src), "status": "ok", "num_boxes": K})
    pq.write_table(pa.Table.from_pylist(rows), root / "features-000000.parquet")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(1)
    images = {}
    for name, size in (("photos_dog", (160, 120)), ("photos_cat", (90, 140))):
        path = root / f"{name}.jpg"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images[name] = path
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return {"features": write_feature_set(root / "feats", images), "vocab": vocab, "root": root}


def test_merge_word_pieces_averages_rows() -> None:
    tokens = ["[CLS]", "run", "##ning", "dog", "##s", "[SEP]"]
    rows = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.4, 0.6], [9.0, 9.0]])
    words, merged = merge_word_pieces(tokens, rows)
    assert words == ["running", "dogs"]
    assert torch.allclose(merged, torch.tensor([[0.5, 0.5], [0.3, 0.7]]))


def test_explain_pretraining_png_size_and_alignment(setup: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ViLBERTForPretraining(tiny(setup["vocab"], v_target_size=1601))
    with torch.no_grad():
        model.align_head.weight.zero_()
        model.align_head.bias.fill_(0.7)
    run = write_run(tmp_path / "run", model, "pretrain", setup["vocab"], max_text_len=16)
    out = tmp_path / "pics" / "dog.png"
    expl = run_explain(run, setup["features"], "photos_dog", "a dog running on the grass", out,
                       size=(640, 480), device="cpu")  # fmt: skip
    with Image.open(out) as im:
        im.verify()  # a structurally valid PNG
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (640, 480)
    assert expl.words == ["a", "dog", "running", "on", "the", "grass"]
    assert expl.alignment_probability == pytest.approx(1 / (1 + math.exp(-0.7)), rel=1e-5)
    assert expl.vqa_answers is None and expl.region_ranking is None
    for picks in expl.word_regions:  # top 3 detected boxes, heaviest first, probabilities
        assert len(picks) == 3 and all(0 <= i < K for i, _ in picks)
        weights = [w for _, w in picks]
        assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["words"] == expl.words and side["image_id"] == "photos_dog"


def test_explain_vqa_answers_and_refer_ranking(setup: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    answers = ["yes", "no", "dog", "red"]
    model = ViLBERTForTasks(tiny(setup["vocab"], num_answers=4))
    last = [m for m in model.vqa_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, -1.0, 2.0, 1.0]))
        model.region_head.weight.zero_()
        model.region_head.bias.fill_(-0.5)
    vqa_run = write_run(tmp_path / "vqa", model, "vqa", setup["vocab"], answers, max_text_len=16)
    expl = run_explain(
        vqa_run,
        setup["features"],
        "photos_cat",
        "a red cat",
        tmp_path / "q.png",
        size=(500, 700),
        device="cpu",
    )
    sig = [1 / (1 + math.exp(-b)) for b in (2.0, 1.0, 0.0, -1.0)]
    assert [a for a, _ in expl.vqa_answers] == ["dog", "red", "yes", "no"]
    assert [p for _, p in expl.vqa_answers] == pytest.approx(sig, rel=1e-5)
    with Image.open(tmp_path / "q.png") as im:
        assert im.size == (500, 700)

    ref_run = write_run(tmp_path / "ref", model, "refcoco", setup["vocab"], max_text_len=16)
    expl = run_explain(
        ref_run, setup["features"], "photos_cat", "the cat", tmp_path / "r.png", size=(400, 300), device="cpu"
    )
    # all region scores tie at sigmoid(-0.5): the five first boxes, in order
    assert [i for i, _ in expl.region_ranking] == [0, 1, 2, 3, 4]
    assert [p for _, p in expl.region_ranking] == pytest.approx([1 / (1 + math.exp(0.5))] * 5, rel=1e-5)

    with pytest.raises(EvalError, match="did you mean photos_cat"):
        run_explain(ref_run, setup["features"], "photos_cta", "the cat", tmp_path / "x.png", device="cpu")
    with pytest.raises(EvalError, match="alignment head"):
        run_explain(
            ref_run,
            setup["features"],
            "photos_cat",
            "the cat",
            tmp_path / "x.png",
            head="align",
            device="cpu",
        )


def test_cli_explain(setup: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    torch.manual_seed(1)
    run = write_run(
        tmp_path / "run",
        ViLBERTForPretraining(tiny(setup["vocab"], v_target_size=1601)),
        "pretrain",
        setup["vocab"],
        max_text_len=16,
    )
    out = tmp_path / "cli.png"
    args = ["explain", "--model", str(run), "--features", str(setup["features"]), "--image-id", "photos_dog",
            "--text", "a red dog", "--out", str(out), "--size", "300x200", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "alignment probability:" in result.output and "dog:" in result.output
    with Image.open(out) as im:
        assert im.size == (300, 200)
    bad = CliRunner().invoke(app, args[:-4] + ["--size", "300by200"])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output
