"""Input listing and image ids (pipelines.sources) and shard planning (pipelines.planner)."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.planner import inputs_fingerprint, plan_shards, shard_is_done, split_done
from pipelines.sources import SourceError, assign_image_ids, image_id_for, list_sources


def _touch(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _plain_id(relpath: str) -> str:
    """Independent spelling of the id rule: drop the last extension, map unsafe chars to '_'."""
    name = relpath.rsplit("/", 1)[-1]
    stem = relpath[: len(relpath) - (len(name) - name.rfind("."))] if "." in name[1:] else relpath
    return "".join(c if (c.isascii() and (c.isalnum() or c in "_-")) else "_" for c in stem)


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        ("cat.jpg", "cat"),
        ("photos/2019/IMG.0001.JPG", "photos_2019_IMG_0001"),
        ("a b/c+d.png", "a_b_c_d"),
        ("no_extension", "no_extension"),
        ("dir.with.dots/x-y_z.webp", "dir_with_dots_x-y_z"),
        ("caf\u00e9.jpg", "caf_"),
    ],
)
def test_image_id_for_hand_computed(relpath: str, expected: str) -> None:
    assert image_id_for(relpath) == expected
    assert image_id_for(relpath) == _plain_id(relpath)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", image_id_for(relpath, disambiguate=True))


def test_colliding_paths_get_distinct_hash_suffixes_only_when_they_collide() -> None:
    rels = ["a.jpg", "a.png", "a b.jpg", "a_b.gif", "solo.jpg"]
    ids = assign_image_ids(rels)
    assert ids[4] == "solo"
    assert len(set(ids)) == len(ids)
    for rel, i in zip(rels[:4], ids[:4], strict=True):
        assert i == image_id_for(rel, disambiguate=True)
        assert i.startswith(image_id_for(rel) + "_") and len(i) == len(image_id_for(rel)) + 9
    # the suffix depends on the path only, not on what else is listed
    assert assign_image_ids(["a.png", "a.jpg"]) == [ids[1], ids[0]]


def test_folder_listing_is_recursive_sorted_and_skips_non_images(tmp_path: Path) -> None:
    for rel in ["b.png", "a/z.JPG", "a/y/x.gif", "notes.txt", ".hidden.jpg", ".cache/c.jpg", "a/q.tiff"]:
        _touch(tmp_path, rel)
    items = list_sources(tmp_path)
    assert [it.relpath for it in items] == sorted(["a/q.tiff", "a/y/x.gif", "a/z.JPG", "b.png"])
    assert [it.image_id for it in items] == ["a_q", "a_y_x", "a_z", "b"]
    assert all(Path(it.source).is_file() and Path(it.source).is_absolute() for it in items)
    assert [it.image_id for it in list_sources(tmp_path, limit=2)] == ["a_q", "a_y_x"]


def test_file_symlinks_are_inputs_under_their_own_path_even_when_broken(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root, "real.png")
    (root / "alias.png").symlink_to("real.png")
    (root / "loop_a.jpg").symlink_to("loop_b.jpg")  # a loop between two files
    (root / "loop_b.jpg").symlink_to("loop_a.jpg")
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    items = list_sources(root)  # listing a loop must not raise
    assert [(it.image_id, it.source) for it in items] == [
        (name, str(root / f"{name}{ext}"))  # the input path, never the link's target
        for name, ext in [
            ("alias", ".png"),
            ("dangling", ".jpg"),
            ("loop_a", ".jpg"),
            ("loop_b", ".jpg"),
            ("real", ".png"),
        ]
    ]


@pytest.mark.timeout(60)  # following the links blindly never ends: the loop multiplies every path
def test_folder_symlinks_list_each_real_folder_once_and_name_the_loop(tmp_path: Path, caplog) -> None:
    root = tmp_path / "in"
    _touch(root, "a.png")
    _touch(root, "sub/b.png")
    _touch(tmp_path, "elsewhere/c.png")
    (root / "sub" / "up").symlink_to("..")  # a loop: sub/up/sub/up/... for ever
    (root / "again").symlink_to("sub")  # a second way into a listed folder
    (root / "ext").symlink_to(tmp_path / "elsewhere")  # a folder outside: followed
    (root / "ext2").symlink_to(tmp_path / "elsewhere")  # the same outside folder again
    with caplog.at_level("WARNING", logger="pipelines.sources"):
        items = list_sources(root)
    assert [it.relpath for it in items] == ["a.png", "ext/c.png", "sub/b.png"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert any("symlink loop" in w and "sub/up -> .." in w for w in warnings)
    assert any("again -> sub" in w and "listed as sub" in w for w in warnings)
    assert any("ext2 -> " in w and "listed as ext" in w for w in warnings)


def test_fsspec_urls_file_and_memory(tmp_path: Path) -> None:
    import fsspec

    for rel in ["x/1.jpg", "x/2.png", "y.txt"]:
        _touch(tmp_path, rel)
    items = list_sources(f"file://{tmp_path}")
    assert [(it.relpath, it.image_id) for it in items] == [("x/1.jpg", "x_1"), ("x/2.png", "x_2")]
    assert items[0].source == f"file://{tmp_path}/x/1.jpg"

    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/photos/p/q.jpg": b"1", "/bucket/photos/r.webp": b"2", "/bucket/photos/s.csv": b"3"})
    items = list_sources("memory://bucket/photos")
    assert [(it.relpath, it.image_id) for it in items] == [("p/q.jpg", "p_q"), ("r.webp", "r")]
    with fsspec.open(items[0].source, "rb") as f:
        assert f.read() == b"1"


def test_txt_list_with_relative_paths_urls_and_ids(tmp_path: Path) -> None:
    _touch(tmp_path, "imgs/a/1.jpg")
    _touch(tmp_path, "imgs/b/2.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimgs/b/2.jpg\n\nimgs/a/1.jpg\n")
    items = list_sources(listing)
    assert [(it.relpath, it.image_id) for it in items] == [("a/1.jpg", "a_1"), ("b/2.jpg", "b_2")]
    assert items[0].source == str(tmp_path / "imgs/a/1.jpg")

    listing.write_text("imgs/a/1.jpg\tfirst\nimgs/b/2.jpg\tsecond\n")
    assert [it.image_id for it in list_sources(listing)] == ["first", "second"]
    listing.write_text("imgs/a/1.jpg\tbad.id\n")
    with pytest.raises(SourceError, match="bad.id"):
        list_sources(listing)
    listing.write_text("imgs/a/1.jpg\tsame\nimgs/b/2.jpg\tsame\n")
    with pytest.raises(SourceError, match="duplicate"):
        list_sources(listing)


def test_parquet_list_with_and_without_image_id(tmp_path: Path) -> None:
    p = tmp_path / "list.parquet"
    pq.write_table(
        pa.table({"path": ["s3://bkt/x/b.jpg", "s3://bkt/x/a.jpg"], "image_id": ["id_b", "id_a"]}), p
    )
    items = list_sources(p)
    assert [(it.image_id, it.source, it.relpath) for it in items] == [
        ("id_a", "s3://bkt/x/a.jpg", "a.jpg"),
        ("id_b", "s3://bkt/x/b.jpg", "b.jpg"),
    ]
    pq.write_table(pa.table({"url": ["s3://bkt/x/d/b.jpg", "s3://bkt/x/c.jpg"]}), p)
    assert [it.image_id for it in list_sources(p)] == ["c", "d_b"]
    pq.write_table(pa.table({"file": ["a.jpg"]}), p)
    with pytest.raises(SourceError, match="columns"):
        list_sources(p)


def test_bad_sources_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nope"):
        list_sources(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        list_sources(tmp_path / "empty")
    _touch(tmp_path, "x.csv")
    with pytest.raises(SourceError, match="x.csv"):
        list_sources(tmp_path / "x.csv")


def test_plan_is_stable_and_done_means_stats_tar_and_parquet(tmp_path: Path) -> None:
    for i in range(7):
        _touch(tmp_path / "in", f"{i:02d}.png")
    items = list_sources(tmp_path / "in")
    plans = plan_shards(items, 3)
    assert [p.name for p in plans] == ["features-000000", "features-000001", "features-000002"]
    assert [[it.image_id for it in p.items] for p in plans] == [
        ["00", "01", "02"],
        ["03", "04", "05"],
        ["06"],
    ]
    assert plan_shards(list_sources(tmp_path / "in"), 3) == plans
    assert inputs_fingerprint(items) == inputs_fingerprint(list_sources(tmp_path / "in"))
    assert inputs_fingerprint(items) != inputs_fingerprint(items[:-1])

    out = tmp_path / "out"
    out.mkdir()
    for name in (plans[1].tar_name, plans[1].parquet_name):
        (out / name).write_bytes(b"")
    assert not shard_is_done(out, plans[1])  # no stats yet: an interrupted shard
    (out / plans[1].stats_name).write_text("{}")
    assert shard_is_done(out, plans[1])
    done, pending = split_done(out, plans)
    assert [p.index for p in done] == [1] and [p.index for p in pending] == [0, 2]
    with pytest.raises(ValueError, match="shard-size"):
        plan_shards(items, 0)
