"""Helpers for the extraction tests: tiny detector settings and every kind of image file the job must handle."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

TINY = dict(depth=50, min_size=64, max_size=96, max_proposals=5, min_boxes=2, max_boxes=4, batch_size=2)
MEMBERS = {
    "boxes.npy",
    "features.npy",
    "spatial.npy",
    "cls_prob.npy",
    "objects.npy",
    "attributes.npy",
    "json",
}


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    """`img` encoded as JPEG."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int) -> Image.Image:
    """A w x h RGB image of seeded random pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_good_images(root: Path, n: int, offset: int = 0) -> list[Path]:
    """`n` small RGB JPEGs with distinct content."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i + offset:03d}.jpg"
        p.write_bytes(jpeg_bytes(noise(48 + 4 * (i % 3), 36, seed=i + offset)))
        paths.append(p)
    return paths


def make_odd_images(root: Path) -> dict[str, tuple[int, int]]:
    """Every kind of image the job must handle; returns {image id: (width, height) after EXIF}."""
    root.mkdir(parents=True, exist_ok=True)
    base = noise(40, 30, seed=7)
    base.convert("L").save(root / "gray.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    (root / "cmyk.jpg").write_bytes(jpeg_bytes(base.convert("CMYK")))
    Image.fromarray(np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).save(root / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 40x30 -> shown 30x40
    (root / "exif.jpg").write_bytes(jpeg_bytes(base, exif=exif.tobytes()))
    Image.new("RGB", (1, 1), "red").save(root / "tiny.png")
    Image.new("RGB", (1, 5000), "blue").save(root / "strip.png")
    frames = [noise(40, 30, seed=s) for s in (1, 2)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "gray": (40, 30), "palette": (40, 30), "rgba": (40, 30), "cmyk": (40, 30), "sixteen": (40, 30),
        "exif": (30, 40), "tiny": (1, 1), "strip": (1, 5000), "anim": (40, 30),
    }  # fmt: skip


def make_bad_files(root: Path) -> dict[str, str]:
    """Files that must become failed rows; returns {image id: expected reason}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    full = jpeg_bytes(noise(64, 64, seed=3))
    (root / "trunc.jpg").write_bytes(full[: len(full) // 2])
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 100 MP > Pillow's 89.5 MP guard
    return {"empty": "empty", "text": "not_an_image", "trunc": "truncated", "bomb": "too_large"}


def index_rows(out: Path) -> list[dict]:
    """Every parquet index row of a feature set, shard by shard."""
    rows = []
    for p in sorted(out.glob("features-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def tar_bytes(out: Path) -> dict[str, bytes]:
    """{tar name: bytes} of a feature set's shards."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("features-*.tar"))}
