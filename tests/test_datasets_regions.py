"""build_regions / collate edge cases: more regions than kept, no regions at all, float32 views."""

from __future__ import annotations

import io

import numpy as np
from shard_fixtures import make_image

from pipelines.datasets import build_regions, collate


def _sample(im) -> dict[str, bytes]:
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    return {
        "features.npy": npy(im.features),
        "spatial.npy": npy(im.spatial),
        "cls_prob.npy": npy(im.cls_prob),
    }


def test_regions_views_and_cut() -> None:
    im = make_image("x", "x.jpg", k=5, dim=3, seed=4)
    r = build_regions(_sample(im), max_regions=3)
    f32 = im.features.astype(np.float32)
    assert (r.num_regions, r.num_detected) == (4, 3)
    np.testing.assert_allclose(r.feat, np.concatenate([f32.mean(0, keepdims=True), f32[:3]]), rtol=1e-6)
    np.testing.assert_array_equal(r.loc, np.concatenate([[[0, 0, 1, 1, 1]], im.spatial[:3]]))
    assert r.target.shape == (4, 1601) and not r.target[0].any()
    np.testing.assert_array_equal(r.target[1:], im.cls_prob[:3].astype(np.float32))


def test_image_without_regions_pads_cleanly() -> None:
    empty = make_image("e", "e.jpg", k=0, dim=3, seed=0)
    full = make_image("f", "f.jpg", k=2, dim=3, seed=1)
    exs = [
        {"task": "captions", "image_id": im.image_id, "texts": [([2, 3], [0, 0])], "align_label": 1.0,
         "regions": [build_regions(_sample(im), 36)]}
        for im in (empty, full)
    ]  # fmt: skip
    b = collate(exs)
    assert b["image_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert not b["image_feat"][0].any()  # [IMG] of an image with no regions is zero
    np.testing.assert_allclose(
        b["image_feat"][1, 0].numpy(), full.features.astype(np.float32).mean(0), rtol=1e-6
    )
    assert b["image_loc"][0, 0].tolist() == [0, 0, 1, 1, 1] and not b["image_loc"][0, 1:].any()


def test_worker_batches_equal_in_process_batches(tmp_path) -> None:
    """Batches built in DataLoader workers (shared-memory tensors) hold the same values, padding included."""
    import json

    import torch
    from shard_fixtures import write_feature_set, write_vocab

    from pipelines.datasets import TaskDataset, make_loader
    from pipelines.shard_job import run_shard

    images = [make_image(f"i{n}", f"i{n}.jpg", k=n, dim=5, seed=n) for n in range(1, 9)]
    root = write_feature_set(tmp_path / "f", images)
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"image": f"i{n}.jpg", "caption": "a"}) + "\n" for n in range(1, 9))
    )
    run_shard(root, "captions", [tmp_path / "c.jsonl"], "train", tmp_path / "t", shard_size=2, progress=False)
    tok = write_vocab(tmp_path / "v.txt", ["a"])

    def rows(batches) -> dict[str, tuple]:
        out = {}
        for b in batches:
            for i, key in enumerate(b["image_id"]):
                n = int(b["image_mask"][i].sum())
                out[key] = (n, b["image_feat"][i, :n].clone(), b["image_target"][i, :n].clone(),
                            b["image_feat"][i, n:].abs().sum().item(), b["image_target"][i, n:].abs().sum().item())  # fmt: skip
        return out

    kw = dict(batch_size=3, max_regions=4, shuffle_buffer=1)
    here = rows(TaskDataset(tmp_path / "t", "captions", tok, **kw))
    there = rows(make_loader(tmp_path / "t", "captions", tok, num_workers=2, **kw))
    assert sorted(here) == sorted(there) == [f"i{n}" for n in range(1, 9)]
    for key, (n, feat, target, pad_f, pad_t) in here.items():
        assert there[key][0] == n == min(int(key[1:]), 4) + 1
        assert torch.equal(there[key][1], feat) and torch.equal(there[key][2], target)
        assert pad_f == pad_t == there[key][3] == there[key][4] == 0.0
