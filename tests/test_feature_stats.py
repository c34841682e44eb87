"""Feature standardisation: statistics written by `shard`, carried in the model's weights, used by `train`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_fixtures import make_image, write_feature_set

from pipelines.feature_stats import STD_FLOOR, FeatureStats, RunningFeatureStats
from pipelines.formats.tasks import load_task_feature_stats
from pipelines.shard_job import run_shard
from vilbert_core import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert_core.training.trainer import TrainArgs, TrainingError, run_train


def test_running_stats_match_numpy_over_all_regions() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(5, 2, (k, 6)).astype(np.float16) for k in (3, 10, 1)]
    chunks[0][:, 2] = 7.0  # a dimension that never varies: floored, not zero
    chunks[1][:, 2] = 7.0
    chunks[2][:, 2] = 7.0
    running = RunningFeatureStats()
    for c in chunks:
        running.add(c)
    stats = running.result()
    every = np.concatenate(chunks).astype(np.float64)
    assert (stats.images, stats.regions) == (3, 14)
    np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-6)
    std = every.std(0)
    floor = STD_FLOOR * std.mean()
    np.testing.assert_allclose(stats.std, np.maximum(std, floor), rtol=1e-5)
    assert stats.std[2] == pytest.approx(floor, rel=1e-5) and stats.std[2] > 0
    assert RunningFeatureStats().result() is None
    with pytest.raises(ValueError, match="8-d region features after 6-d"):
        running.add(np.zeros((2, 8)))


def test_stats_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    stats = FeatureStats(np.array([1.5, -2.0], np.float32), np.array([0.25, 3.0], np.float32), 4, 40)
    stats.save(tmp_path / "s.json")
    back = FeatureStats.load(tmp_path / "s.json")
    assert np.array_equal(back.mean, stats.mean) and np.array_equal(back.std, stats.std)
    assert (back.images, back.regions, back.feature_dim) == (4, 40, 2)
    (tmp_path / "bad.json").write_text(json.dumps({**stats.to_dict(), "std": [0.0, 1.0]}))
    with pytest.raises(ValueError, match="bad.json.*std positive"):
        FeatureStats.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="other.json: not a vilbert-data feature statistics file"):
        FeatureStats.load(tmp_path / "other.json")


def test_shard_writes_the_statistics_of_every_region_it_wrote(tmp_path: Path) -> None:
    images = [make_image(f"coco_{i:012d}", f"coco_{i:012d}.jpg", k=3 + i, dim=8, seed=i) for i in range(5)]
    feats = write_feature_set(tmp_path / "feats", images)
    # captions for images 0, 1, 3 only: the statistics cover exactly their regions
    caps = {"images": [{"id": i, "file_name": f"coco_{i:012d}.jpg"} for i in (0, 1, 3)],
            "annotations": [{"id": i, "image_id": i, "caption": "a b"} for i in (0, 1, 3)]}  # fmt: skip
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    info = run_shard(feats, "captions", [tmp_path / "caps.json"], "train", tmp_path / "task", progress=False)
    assert info["feature_stats"] == "feature_stats.json"
    stats = load_task_feature_stats(tmp_path / "task")
    regions = np.concatenate([images[i].features.astype(np.float64) for i in (0, 1, 3)])
    assert (stats.images, stats.regions) == (3, regions.shape[0])
    np.testing.assert_allclose(stats.mean, regions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, regions.std(0), rtol=1e-5)
    assert load_task_feature_stats(tmp_path / "feats") is None  # not a TASKDIR with statistics


def _inputs(cfg: ViLBERTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, cfg.vocab_size, (2, 6), generator=g),
        "image_feat": torch.rand(2, 4, cfg.v_feature_size, generator=g) * 10 + 3,
        "image_loc": torch.rand(2, 4, 5, generator=g),
    }


def test_standardising_model_equals_raw_model_on_standardised_features(tmp_path: Path) -> None:
    """The reference model fed (x - mean) / std by hand gives what the standardising model gives on x."""
    cfg = ViLBERTConfig.preset("tiny", v_feature_norm="standardize")
    torch.manual_seed(0)
    model = ViLBERTForTasks(cfg).eval()
    mean, std = torch.rand(cfg.v_feature_size) * 8, torch.rand(cfg.v_feature_size) + 0.5
    model.set_feature_stats(mean, std)
    raw = ViLBERTForTasks(dataclasses.replace(cfg, v_feature_norm="none")).eval()
    state = {k: v for k, v in model.state_dict().items() if "feature_mean" not in k and "feature_std" not in k}
    raw.load_state_dict(state)
    x = _inputs(cfg)
    with torch.no_grad():
        a = model(**x).vqa_logits
        b = raw(**{**x, "image_feat": (x["image_feat"] - mean) / std}).vqa_logits
    torch.testing.assert_close(a, b)
    # the statistics travel with the weights
    model.save_pretrained(tmp_path / "m")
    back = ViLBERTForTasks.from_pretrained(tmp_path / "m")
    assert back.config.v_feature_norm == "standardize"
    torch.testing.assert_close(back.vilbert.image_embeddings.feature_mean, mean)
    with torch.no_grad():
        torch.testing.assert_close(back(**x).vqa_logits, a)
    # a raw model has no statistics (its state dict stays the reference's) and refuses to be given some
    assert not any("feature_mean" in k for k in raw.state_dict())
    with pytest.raises(ValueError, match="v_feature_norm is 'none'"):
        raw.set_feature_stats(mean, std)
    with pytest.raises(ValueError, match="size 3/3"):
        model.set_feature_stats(torch.zeros(3), torch.ones(3))


def test_reference_configs_and_old_project_configs_read_as_raw(tmp_path: Path) -> None:
    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "vilbert_base_config.json"
    if ref.is_file():
        assert ViLBERTConfig.from_json_file(ref).v_feature_norm == "none"
    old = ViLBERTConfig.preset("tiny").to_dict()
    del old["v_feature_norm"]  # written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert ViLBERTConfig.from_json_file(tmp_path / "config.json").v_feature_norm == "none"
    with pytest.raises(ValueError, match="v_feature_norm 'batch'"):
        ViLBERTConfig.preset("tiny", v_feature_norm="batch")


@pytest.fixture
def caption_task(tmp_path: Path) -> dict[str, Path]:
    """A captions TASKDIR from a small feature set, and a vocabulary."""
    images = [make_image(f"coco_{i:012d}", f"coco_{i:012d}.jpg", k=4, dim=16, seed=i) for i in range(6)]
    feats = write_feature_set(tmp_path / "feats", images, per_shard=3)
    caps = {"images": [{"id": i, "file_name": f"coco_{i:012d}.jpg"} for i in range(6)],
            "annotations": [{"id": i, "image_id": i, "caption": "a dog on grass"} for i in range(6)]}  # fmt: skip
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    run_shard(feats, "captions", [tmp_path / "caps.json"], "train", tmp_path / "task", progress=False)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "grass"]) + "\n")
    return {"task": tmp_path / "task", "vocab": vocab, "images": images}


def _pretrain(task: dict[str, Path], out: Path, **kw: object) -> dict:
    args = dict(task="pretrain", data=str(task["task"]), out=str(out), vocab=str(task["vocab"]), config="tiny",
                batch_size=4, steps=2, lr=1e-3, num_workers=0, progress=False, tensorboard=False, device="cpu")  # fmt: skip
    return run_train(TrainArgs(**{**args, **kw}))


@pytest.mark.usefixtures("one_thread")
def test_trainer_gives_a_new_model_the_shards_statistics(tmp_path: Path, caption_task: dict[str, Path]) -> None:
    _pretrain(caption_task, tmp_path / "run")
    model = ViLBERTForPretraining.from_pretrained(tmp_path / "run")
    stats = load_task_feature_stats(caption_task["task"])
    assert model.config.v_feature_norm == "standardize"
    assert np.array_equal(model.vilbert.image_embeddings.feature_mean.numpy(), stats.mean)
    assert np.array_equal(model.vilbert.image_embeddings.feature_std.numpy(), stats.std)

    # without feature_stats.json (older shards): computed from the training batches' real regions
    (caption_task["task"] / "feature_stats.json").unlink()
    _pretrain(caption_task, tmp_path / "run2")
    model2 = ViLBERTForPretraining.from_pretrained(tmp_path / "run2")
    np.testing.assert_allclose(model2.vilbert.image_embeddings.feature_mean.numpy(), stats.mean, rtol=1e-5)
    source = json.loads((tmp_path / "run2" / "train_args.json").read_text())["feature_stats_source"]
    assert source == "the regions of the first 6 training examples (no feature_stats.json)"

    # the reference's raw input on request; a checkpoint keeps its own and refuses a contradiction
    _pretrain(caption_task, tmp_path / "raw", feature_norm="none")
    assert ViLBERTForPretraining.from_pretrained(tmp_path / "raw").config.v_feature_norm == "none"
    with pytest.raises(TrainingError, match="trained with v_feature_norm='standardize'"):
        _pretrain(caption_task, tmp_path / "ft", init_from=str(tmp_path / "run"), feature_norm="none")
    with pytest.raises(TrainingError, match="--feature-norm 'bogus'"):
        _pretrain(caption_task, tmp_path / "bad", feature_norm="bogus")
