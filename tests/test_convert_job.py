"""`vilbert-data convert` / `export` end to end on one shared Ray instance.

Each released layout is written by the test the way the releases' scripts write it (random arrays, a
few images, bad records), converted, and every array of the feature set compared bit for bit with what
was written; then export -> convert round trips, a SIGKILLed multi-file TSV conversion resumed,
the shard job and data loader on a converted set, and --recompute-classes with a (random) detector.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from convert_fixtures import (
    Img,
    b64,
    butd_line,
    lxmert_line,
    make_images,
    npy_dict_bytes,
    npz_bytes,
    pickled,
    vilbert_value,
    write_lmdb,
)
from typer.testing import CliRunner

from pipelines.convert_job import ConvertOptions, run_convert
from pipelines.distributor import ExtractJobError
from pipelines.export_job import run_export

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: each job joins it instead of starting its own (seconds each)."""
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=80 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _opts(**kw) -> ConvertOptions:
    return ConvertOptions(**{"progress": False, "workers": 1, **kw})


def read_set(out: Path) -> dict[str, dict]:
    """Every sample of a feature set: {image id: {member: array, "json": dict}}, via dataset.json's shards."""
    samples: dict[str, dict] = {}
    for shard in json.loads((out / "dataset.json").read_text())["shards"]:
        with tarfile.open(out / shard) as tar:
            for m in tar:
                key, member = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                value = (
                    json.loads(data) if member == "json" else np.load(io.BytesIO(data), allow_pickle=False)
                )
                samples.setdefault(key, {})[member] = value
    return samples


def index_rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted(out.glob("features-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def failed(out: Path) -> dict[str, tuple[str, str]]:
    return {r["image_id"]: (r["reason"], r["error"]) for r in index_rows(out) if r["status"] == "failed"}


def spatial_of(img: Img) -> np.ndarray:
    """The spatial vector written out independently: [x1/W, y1/H, x2/W, y2/H, area/(W H)]."""
    b, w, h = img.boxes.astype(np.float64), img.width, img.height
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (w * h)
    return np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, area], 1).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_regions(sample: dict, img: Img, cls_prob: np.ndarray | None) -> None:
    """boxes, features, spatial, cls_prob of a converted sample against what the test wrote."""
    k = len(img.boxes)
    assert same_bits(sample["boxes.npy"], img.boxes)
    assert same_bits(sample["features.npy"], img.features)
    assert np.allclose(sample["spatial.npy"], spatial_of(img), rtol=0, atol=1e-7)
    assert sample["spatial.npy"].dtype == np.float32 and sample["spatial.npy"].shape == (k, 5)
    expected = np.zeros((k, 1601), np.float32) if cls_prob is None else cls_prob
    assert same_bits(sample["cls_prob.npy"], expected)
    meta = sample["json"]
    assert (meta["width"], meta["height"], meta["num_boxes"]) == (img.width, img.height, k)


def best(prob: np.ndarray) -> np.ndarray:
    """[1-based argmax over columns 1:, max] per row, as float32 (objects.npy / attributes.npy)."""
    return np.stack([prob[:, 1:].argmax(1) + 1, prob[:, 1:].max(1)], 1).astype(np.float32)


# ----------------------------------------------------------------------------- the four layouts


@pytest.fixture(scope="module")
def butd_plain(ray_cluster, tmp_path_factory) -> tuple[list[Img], Path, Path, object]:
    """Two bottom-up-attention TSV files (6 good images, 5 bad records) converted: (images, src, out, result)."""
    tmp_path = tmp_path_factory.mktemp("butd")
    imgs = make_images(8)
    nan = imgs[6].features.copy()
    nan[1, 5] = np.nan
    outside = imgs[7].boxes.copy()
    outside[0, 2] = imgs[7].width + 5
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "part.tsv.0").write_bytes(
        b"".join(butd_line(i) for i in imgs[:3]) + butd_line(imgs[6], features=b64(nan))
    )
    (tmp_path / "src" / "part.tsv.1").write_bytes(
        b"".join(butd_line(i) for i in imgs[3:6])
        + butd_line(imgs[7], boxes=b64(outside))
        + butd_line(make_images(1, first_id=90)[0], features=b"@@not-base64@@")
        + butd_line(make_images(1, first_id=91)[0], num_boxes=b"99")
        + b"92\t10\t10\n"
    )
    result = run_convert([tmp_path / "src"], tmp_path / "out", _opts(shard_size=2, workers=2))
    return imgs, tmp_path / "src", tmp_path / "out", result


@pytest.fixture(scope="module")
def butd_cls(ray_cluster, tmp_path_factory) -> tuple[list[Img], Path, object]:
    """A TSV of the forks with cls_prob and attrs (7th, 8th fields), converted: (images, out, result)."""
    tmp_path = tmp_path_factory.mktemp("butd_cls")
    imgs = make_images(5, seed=6)
    src = tmp_path / "with_cls.tsv"
    src.write_bytes(b"".join(butd_line(i, cls_prob=True, attrs=True) for i in imgs))
    return imgs, tmp_path / "a", run_convert([src], tmp_path / "a", _opts(shard_size=2))


def test_butd_tsv_two_files_bit_exact_and_bad_records_failed(butd_plain) -> None:
    imgs, src, out, result = butd_plain
    assert result.exit_code == 3
    reasons = {k: v[0] for k, v in failed(out).items()}
    assert reasons == {
        "7": "not_finite", "8": "box_outside_image", "90": "bad_base64", "91": "bad_num_boxes", "92": "bad_fields",
    }  # fmt: skip
    assert "features of box 1" in failed(out)["7"][1] and "part.tsv.0@" in failed(out)["7"][1]
    samples = read_set(out)
    assert sorted(samples, key=int) == [i.image_id for i in imgs[:6]]
    for img in imgs[:6]:
        s = samples[img.image_id]
        assert_regions(s, img, None)
        assert not s["objects.npy"].any() and not s["attributes.npy"].any()  # lacked: zeros, not invented
        assert s["json"]["record"].startswith(str(src.resolve()))
    ds = result.dataset
    assert (
        ds["source"]["format"] == "butd-tsv" and ds["feature_dim"] == 2048 and ds["feature_layer"] == "res5"
    )
    assert ds["class_distributions"] is False and ds["lacks"] == ["cls_prob", "objects", "attributes"]
    assert ds["detector"] is None and ds["counts"] == {
        "images": 11, "ok": 6, "failed": 5, "failed_by_reason": {r: 1 for r in sorted(reasons.values())},
    }  # fmt: skip

    from pipelines.inspect import format_summary, summarize

    text = format_summary(summarize(out))
    assert "converted from butd-tsv; lacks: cls_prob, objects, attributes" in text and "bad_base64=1" in text


def test_lxmert_tsv_ids_shift_to_one_based_and_bad_record(ray_cluster, tmp_path: Path) -> None:
    imgs = make_images(3, dim=64, seed=1)
    for i, img in enumerate(imgs):
        img.image_id = f"COCO_val2014_{i:012d}"
    bad = make_images(1, dim=64, seed=2)[0]
    bad.image_id = "COCO_val2014_bad"
    src = tmp_path / "train2014_obj36.tsv"
    src.write_bytes(b"".join(lxmert_line(i) for i in imgs) + lxmert_line(bad, num_boxes=b"2"))
    result = run_convert([src], tmp_path / "out", _opts())
    assert result.exit_code == 3 and failed(tmp_path / "out")["COCO_val2014_bad"][0] == "bad_num_boxes"
    samples = read_set(tmp_path / "out")
    for img in imgs:
        s = samples[img.image_id]
        assert_regions(s, img, None)
        objects = np.stack([img.objects_id + 1, img.objects_conf], 1).astype(np.float32)
        attributes = np.stack([img.attrs_id + 1, img.attrs_conf], 1).astype(np.float32)
        assert same_bits(s["objects.npy"], objects) and same_bits(s["attributes.npy"], attributes)
    assert result.dataset["source"]["format"] == "lxmert-tsv" and result.dataset["lacks"] == ["cls_prob"]
    assert result.dataset["feature_dim"] == 64


class Evil:
    """A pickle that would create a marker file when unpickled by a plain pickle.loads."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_vilbert_lmdb_values_bit_exact_and_a_malicious_pickle_refused(ray_cluster, tmp_path: Path) -> None:
    imgs = make_images(4, seed=3)
    marker = tmp_path / "PWNED"
    values = {i.image_id.encode(): pickled(vilbert_value(i)) for i in imgs[:3]}  # releases: base64 strings
    values[imgs[3].image_id.encode()] = pickle.dumps(vilbert_value(imgs[3], arrays=True))  # convert script
    values[b"66"] = pickled({**vilbert_value(imgs[0]), "features": Evil(marker)})
    values[b"67"] = pickled({**vilbert_value(imgs[0]), "boxes": "%%%"})
    keys = [i.image_id.encode() for i in imgs] + [b"66", b"67"]
    write_lmdb(tmp_path / "coco.lmdb", values, pickled(keys))

    result = run_convert([tmp_path / "coco.lmdb"], tmp_path / "out", _opts(shard_size=4))
    assert not marker.exists(), "the malicious pickle ran"
    bad = failed(tmp_path / "out")
    assert bad["66"][0] == "unsafe_pickle" and "posix.system" in bad["66"][1] and "[b'66']" in bad["66"][1]
    assert bad["67"][0] == "bad_base64" and result.exit_code == 3
    samples = read_set(tmp_path / "out")
    assert list(samples) == [i.image_id for i in imgs]  # the key list's order
    for img in imgs:
        assert_regions(samples[img.image_id], img, img.cls_prob)
        assert same_bits(samples[img.image_id]["objects.npy"], best(img.cls_prob))
    assert result.dataset["class_distributions"] is True and result.dataset["lacks"] == ["attributes"]


def test_npz_dir_bua_npz_and_vilbert_npy_bit_exact(ray_cluster, tmp_path: Path) -> None:
    imgs = make_images(4, seed=4)
    root = tmp_path / "feats"
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "COCO_val2014_000000000001.npz").write_bytes(npz_bytes(imgs[0]))
    (root / "val2014" / "COCO_val2014_000000000002.npz").write_bytes(npz_bytes(imgs[1]))
    (root / "extra").mkdir()
    (root / "extra" / "img3.npy").write_bytes(npy_dict_bytes(imgs[2]))
    outside = make_images(1, seed=5)[0]
    outside.boxes[2, 3] = outside.height + 1
    (root / "extra" / "img4.npz").write_bytes(npz_bytes(outside))
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    np.save(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    (root / "extra" / "img5.npy").write_bytes(buf.getvalue())

    result = run_convert([root], tmp_path / "out", _opts(shard_size=2, workers=2))
    assert not marker.exists()
    assert {k: v[0] for k, v in failed(tmp_path / "out").items()} == {
        "extra_img4": "box_outside_image", "extra_img5": "unsafe_pickle",
    }  # fmt: skip
    samples = read_set(tmp_path / "out")
    npz_ids = ["val2014_COCO_val2014_000000000001", "val2014_COCO_val2014_000000000002"]
    assert sorted(samples) == ["extra_img3", *npz_ids]
    for image_id, img in zip(npz_ids, imgs, strict=False):
        assert_regions(samples[image_id], img, None)
        objects = np.stack([img.objects_id + 1, img.objects_conf], 1).astype(np.float32)
        assert same_bits(samples[image_id]["objects.npy"], objects)
    assert_regions(samples["extra_img3"], imgs[2], imgs[2].cls_prob)
    # cls_prob only in the .npy file: the set as a whole lacks class distributions
    assert result.dataset["class_distributions"] is False and result.dataset["source"]["format"] == "npz-dir"


# ----------------------------------------------------------------------------- export round trip


def test_convert_export_convert_is_bit_exact(butd_cls, tmp_path: Path) -> None:
    imgs, first_out, first = butd_cls
    assert first.exit_code == 0 and first.dataset["lacks"] == []
    a = read_set(first_out)
    for img in imgs:
        assert_regions(a[img.image_id], img, img.cls_prob)
        assert same_bits(a[img.image_id]["attributes.npy"], best(img.attr_prob))

    lmdb_summary = run_export(first_out, "vilbert-lmdb", tmp_path / "x.lmdb", progress=False)
    assert lmdb_summary["images"] == 5 and lmdb_summary["with_cls_prob"]
    second = run_convert([tmp_path / "x.lmdb"], tmp_path / "b", _opts(shard_size=3))
    run_export(tmp_path / "b", "butd-tsv", tmp_path / "x.tsv", progress=False)
    third = run_convert([tmp_path / "x.tsv"], tmp_path / "c", _opts(format="butd-tsv"))
    assert second.dataset["source"]["format"] == "vilbert-lmdb" and third.exit_code == 0
    for other in (read_set(tmp_path / "b"), read_set(tmp_path / "c")):
        assert sorted(other) == sorted(a)
        for key, sample in a.items():
            for member in ("boxes.npy", "features.npy", "spatial.npy", "cls_prob.npy", "objects.npy"):
                assert same_bits(other[key][member], sample[member]), (key, member)
    # neither layout has a place for attribute ids: the re-converted sets say they lack them
    assert third.dataset["lacks"] == ["attributes"] and third.dataset["class_distributions"] is True

    # the releases' own reader code reads our LMDB (keys list, base64 float32 values)
    import lmdb

    env = lmdb.open(str(tmp_path / "x.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        ids = pickle.loads(txn.get(b"keys"))
        item = pickle.loads(txn.get(ids[0]))
    env.close()
    assert ids == [i.image_id.encode() for i in imgs] and item["image_id"] == int(imgs[0].image_id)
    import base64

    feats = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(
        item["num_boxes"], 2048
    )
    assert same_bits(feats, imgs[0].features)

    with pytest.raises(ValueError, match="already exists"):
        run_export(first_out, "butd-tsv", tmp_path / "x.tsv", progress=False)


# ----------------------------------------------------------------------------- kill -9 and resume

_KILL_SCRIPT = """
import sys, time
from pipelines.convert_job import ConvertOptions, run_convert

class Slow:
    # each record takes a while, so that the job can be killed between its shards
    def __call__(self, spec):
        worker = spec()
        write = worker.write_shard

        def slow(plan, out, report=None):
            return write(plan, out, lambda ok, failed: (time.sleep(0.4), report(ok, failed)))

        worker.write_shard = slow
        worker.spec.report_every_s = 0.0
        return worker

opts = ConvertOptions(shard_size=2, workers=2, ray_address=sys.argv[2], progress=False)
run_convert(sys.argv[3:], sys.argv[1], opts, worker_factory=Slow())
"""


def test_sigkill_mid_run_then_rerun_converts_every_record_exactly_once(ray_cluster, tmp_path: Path) -> None:
    imgs = make_images(12, dim=32, seed=7)
    files = []
    for n in range(3):
        path = tmp_path / f"feats.tsv.{n}"
        path.write_bytes(b"".join(butd_line(i) for i in imgs[4 * n : 4 * n + 4]))
        files.append(str(path))
    reference = run_convert(files, tmp_path / "ref", _opts(shard_size=2, workers=2))
    n_shards = reference.dataset["summary"]["shards"]
    assert reference.exit_code == 0 and n_shards >= 5

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), ray_cluster, *files])
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*_stats.json")):
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup of any kind in the driver
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the job ended by itself before it could be killed"
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    assert 1 <= len(finished) < n_shards, f"the kill came at the wrong moment: {sorted(finished)}"
    assert not (out / "dataset.json").exists()

    result = run_convert(files, out, _opts(shard_size=2, workers=2))
    assert result.exit_code == 0 and result.summary["shards_resumed"] >= len(finished)
    for name, mtime in finished.items():  # finished shards were kept, not redone
        assert (out / name).stat().st_mtime_ns == mtime
    ids = [r["image_id"] for r in index_rows(out)]
    assert sorted(ids, key=int) == [i.image_id for i in imgs] and len(ids) == len(set(ids))
    for shard in reference.dataset["shards"]:
        assert (out / shard).read_bytes() == (tmp_path / "ref" / shard).read_bytes()
    assert not list(out.glob(".*tmp*"))

    with pytest.raises(ExtractJobError, match="shard_size"):  # another setting into the same folder
        run_convert(files, out, _opts(shard_size=3))


# ----------------------------------------------------------------------------- downstream and CLI


def _captions(path: Path, ids: list[str]) -> Path:
    images = [{"id": int(i), "file_name": f"COCO_train2014_{int(i):012d}.jpg"} for i in ids]
    anns = [{"image_id": int(i), "id": n, "caption": "a red box"} for n, i in enumerate(ids)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_shard_refuses_pretraining_without_class_distributions_and_loader_reads_converted(
    butd_plain, butd_cls, tmp_path: Path
) -> None:
    from shard_fixtures import write_vocab

    from pipelines.datasets import TaskDataset
    from pipelines.shard_job import ShardError, run_shard

    plain_imgs, _src, plain, _ = butd_plain
    imgs, with_cls, _ = butd_cls
    captions = _captions(tmp_path / "c0.json", [i.image_id for i in plain_imgs[:6]])
    with pytest.raises(ShardError, match="no class distributions .* --recompute-classes --weights CKPT"):
        run_shard(plain, "captions", [captions], "train", tmp_path / "t0", progress=False)

    captions = _captions(tmp_path / "captions.json", [i.image_id for i in imgs])
    info = run_shard(with_cls, "captions", [captions], "train", tmp_path / "t", progress=False)
    assert info["counts"]["images"] == 5 and info["features"]["feature_dim"] == 2048
    assert info["features"]["class_distributions"] is True
    tok = write_vocab(tmp_path / "vocab.txt", ["a", "red", "box"])
    batch = next(iter(TaskDataset(tmp_path / "t", "captions", tok, batch_size=5, shuffle_buffer=1)))
    by_id = {i.image_id: i for i in imgs}
    assert sorted(batch["image_id"]) == sorted(by_id)
    for row, image_id in enumerate(batch["image_id"]):
        img = by_id[image_id]
        k = len(img.boxes)
        assert np.array_equal(batch["image_feat"][row, 1 : k + 1].numpy(), img.features)
        assert np.array_equal(batch["image_target"][row, 1 : k + 1].numpy(), img.cls_prob)


def test_cli_convert_and_export_exit_codes(ray_cluster, tmp_path: Path) -> None:
    from cli import app

    imgs = make_images(2, dim=8, seed=9)
    (tmp_path / "a.tsv").write_bytes(butd_line(imgs[0]) + butd_line(imgs[1], image_w=b"-3"))
    runner = CliRunner()
    res = runner.invoke(
        app, ["convert", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert res.exit_code == 3, res.output
    assert "source: butd-tsv" in res.output and "lacks: cls_prob, objects, attributes" in res.output
    assert failed(tmp_path / "o")["2"][0] == "bad_size"

    res = runner.invoke(
        app, ["export", str(tmp_path / "o"), "--format", "butd-tsv", "--out", str(tmp_path / "e.tsv")]
    )
    assert res.exit_code == 0 and "wrote 1 images" in res.output and "no cls_prob" in res.output
    assert (tmp_path / "e.tsv").read_bytes() == butd_line(imgs[0])  # the same line, byte for byte

    (tmp_path / "notes.txt").write_text("hello\tworld\n")
    res = runner.invoke(app, ["convert", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot tell the layout" in res.output
    res = runner.invoke(
        app, ["convert", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "x"), "--recompute-classes"]
    )
    assert res.exit_code == 2 and "--weights" in res.output


# ----------------------------------------------------------------------------- --recompute-classes


def test_recompute_classes_runs_the_given_box_mode_on_the_original_images(
    ray_cluster, tmp_path: Path
) -> None:
    from PIL import Image

    from extract import Detector, DetectorConfig, load_image

    imgs = make_images(3, dim=8, seed=10)
    (tmp_path / "images").mkdir()
    for img in imgs[:2]:
        rng = np.random.default_rng(int(img.image_id))
        pixels = rng.integers(0, 256, (img.height, img.width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"COCO_val2014_{int(img.image_id):012d}.png")
    src = tmp_path / "plain.tsv"
    src.write_bytes(b"".join(butd_line(i) for i in imgs))  # image 3 has no file
    tiny = dict(depth=50, min_size=64, max_size=96)
    opts = _opts(recompute_classes=True, images=str(tmp_path / "images"), device="cpu", detector_extra=tiny)
    result = run_convert([src], tmp_path / "out", opts)

    assert failed(tmp_path / "out")["3"][0] == "image_not_found"
    ds = result.dataset
    assert ds["class_distributions"] is True and ds["lacks"] == [] and ds["recomputed"] == [
        "cls_prob", "objects", "attributes",
    ]  # fmt: skip
    assert ds["detector"]["random_weights"] is True and ds["detector"]["depth"] == 50
    detector = Detector.from_checkpoint(
        None, device="cpu", feature_layer="res5", config=DetectorConfig(**tiny)
    )
    samples = read_set(tmp_path / "out")
    for img in imgs[:2]:
        path = tmp_path / "images" / f"COCO_val2014_{int(img.image_id):012d}.png"
        det = detector.features_for_boxes(load_image(path.read_bytes()), img.boxes)
        s = samples[img.image_id]
        assert_regions(s, img, s["cls_prob.npy"])  # boxes, features, spatial: the source's, unchanged
        assert np.allclose(s["cls_prob.npy"], det.cls_prob, atol=1e-5)
        assert np.array_equal(s["objects.npy"][:, 0], det.object_ids.astype(np.float32))
        assert math.isclose(float(s["cls_prob.npy"].sum()), len(img.boxes), rel_tol=1e-4)
        assert s["json"]["source"] == str(path.resolve())
