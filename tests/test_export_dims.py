"""`export --format vilbert-lmdb` and the feature size its usual reader assumes."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import DIM, feature_set

from pipelines.export_job import run_export


def test_vilbert_lmdb_export_refuses_features_its_reader_cannot_load(tmp_path: Path) -> None:
    feats = feature_set(tmp_path / "feats", 3)
    assert DIM != 2048
    # vilbert-multi-task's ImageFeaturesH5Reader reshapes every record to (num_boxes, 2048)
    with pytest.raises(ValueError, match=rf"{DIM}-d, but vilbert-multi-task's ImageFeaturesH5Reader .* 2048-d"):
        run_export(feats, "vilbert-lmdb", tmp_path / "x.lmdb", progress=False)
    assert not (tmp_path / "x.lmdb").exists()

    summary = run_export(feats, "vilbert-lmdb", tmp_path / "x.lmdb", progress=False, any_feature_dim=True)
    assert summary["images"] == 3
    import lmdb

    env = lmdb.open(str(tmp_path / "x.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        item = pickle.loads(txn.get(pickle.loads(txn.get(b"keys"))[0]))
    env.close()
    features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32)
    assert features.size == item["num_boxes"] * DIM  # the set's own size, for readers that take it from the data

    # the TSV layout's readers take the size from the data: nothing to refuse
    assert run_export(feats, "butd-tsv", tmp_path / "x.tsv", progress=False)["images"] == 3
