"""Image decoding and preprocessing: odd modes, EXIF rotation, animations, bombs, broken files, odd sizes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from extract import Detector, DetectorConfig, ImageDecodeError, load_image
from extract.detector import resize_scale


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """Image -> encoded bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pixel(img: Image.Image, x: int = 0, y: int = 0) -> tuple[int, int, int]:
    """RGB value at (x, y)."""
    return tuple(int(v) for v in np.asarray(img)[y, x])


@pytest.mark.parametrize(
    "mode,value,fmt,expected",
    [
        ("L", 100, "PNG", (100, 100, 100)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("LA", (80, 0), "PNG", (255, 255, 255)),  # fully transparent -> white background
        ("LA", (80, 255), "PNG", (80, 80, 80)),
        ("RGBA", (10, 20, 30, 255), "PNG", (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), "PNG", (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), "TIFF", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("I;16", 65535, "TIFF", (255, 255, 255)),  # 16-bit white stays white, not clipped from 65535
        ("I;16", 0, "TIFF", (0, 0, 0)),
        ("YCbCr", (76, 85, 255), "TIFF", None),  # red in YCbCr: checked loosely below
    ],
)
def test_every_mode_becomes_rgb(mode, value, fmt, expected):
    img = load_image(encode(Image.new(mode, (6, 4), value), fmt))
    assert img.mode == "RGB" and img.size == (6, 4)
    if expected is None:
        r, g, b = pixel(img)
        assert r > 200 and g < 60 and b < 60
    else:
        assert pixel(img) == expected


def test_wide_grey_modes_scale_their_range():
    ramp = np.array([[0, 1000, 2000, 4000]], dtype=np.int32)
    img = load_image(encode(Image.fromarray(ramp, mode="I"), "TIFF"))
    assert [pixel(img, x)[0] for x in range(4)] == [0, 64, 128, 255]  # (v - min) * 255 / (max - min), rounded
    f = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), mode="F")
    img = load_image(encode(f, "TIFF"))
    assert [pixel(img, x)[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_transparency_and_palette_alpha():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 = blue
    assert pixel(load_image(encode(p, "PNG"))) == (0, 0, 255)
    assert pixel(load_image(encode(p, "PNG", transparency=1))) == (255, 255, 255)  # PA in practice
    assert pixel(load_image(encode(p, "GIF", transparency=0))) == (0, 0, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red block top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    out = load_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    r, g, b = pixel(out, 17, 2)  # the red block is now top-right
    assert r > 200 and b < 60
    r, g, b = pixel(out, 2, 2)
    assert b > 200 and r < 60


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    img = load_image(path)
    r, g, b = pixel(img)
    assert r > 200 and b < 60


def test_decompression_bombs_are_too_large():
    data = encode(Image.new("L", (100, 100)), "PNG")
    for limit in (1000, 6000):  # far above the limit (Pillow's own error) and just above it
        with pytest.raises(ImageDecodeError) as err:
            load_image(data, max_pixels=limit)
        assert err.value.reason == "too_large"
    assert load_image(data, max_pixels=10_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS != 1000  # the global limit is restored


def test_broken_inputs_have_reasons(tmp_path):
    rng = np.random.default_rng(0)
    jpeg = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    png = bytearray(encode(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG"))
    png[60:-20] = bytes(b ^ 0x5A for b in png[60:-20])  # scrambled compressed data
    cases = {
        "empty": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "not_an_image": b"%PDF-1.4 this is not a picture",
        "corrupt": bytes(png),
    }
    for reason, data in cases.items():
        with pytest.raises(ImageDecodeError) as err:
            load_image(data)
        assert err.value.reason == reason, (reason, str(err.value))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg"):
        load_image(empty)


def test_resize_scale_by_hand():
    assert resize_scale(480, 640, 600, 1000) == 1.25  # short side to 600, long side 800
    assert resize_scale(100, 1000, 600, 1000) == 1.0  # 6x would make the long side 6000: capped
    assert resize_scale(1, 5000, 600, 1000) == 0.2
    assert resize_scale(1, 1, 600, 1000) == 600.0


@pytest.fixture(scope="module")
def tiny_detector() -> Detector:
    """Depth 50, small input and 4 proposals: these tests are about shapes, not arithmetic."""
    cfg = DetectorConfig(
        depth=50, min_size=64, max_size=96, pre_nms_topk=200, post_nms_topk=4, min_boxes=2, max_boxes=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Detector.from_checkpoint(None, device="cpu", config=cfg)


def test_preprocessing_is_bgr_minus_mean(tiny_detector):
    img = Image.new("RGB", (64, 64), (10, 20, 30))  # short side already 64: no resize
    batch = tiny_detector.preprocess([img])
    assert batch.input_sizes == [(64, 64)] and batch.scales == [1.0]
    expected = torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717])
    torch.testing.assert_close(batch.tensor[0, :, 5, 7], expected)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (3, 900)])
def test_tiny_and_elongated_images(tiny_detector, size):
    w, h = size
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))
    batch = tiny_detector.preprocess([img])
    assert max(batch.input_sizes[0]) <= 96  # the long side is capped whatever the aspect ratio
    (det,) = tiny_detector.detect([img])
    assert (det.image_w, det.image_h) == (w, h)
    assert 2 <= det.num_boxes <= 4
    assert np.isfinite(det.features).all() and np.isfinite(det.boxes).all()
    assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= w).all()
    assert (det.boxes[:, 1] >= 0).all() and (det.boxes[:, 3] <= h).all()
