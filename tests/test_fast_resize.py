"""The fast bicubic resize gives Pillow's pixels exactly, and falls back to Pillow cleanly."""
import numpy as np
import pytest
from PIL import Image

from owl_jax.data import fast_resize, images

needs_kernel = pytest.mark.skipif(not fast_resize.available(), reason="no AVX2 / C++ compiler")


def _image(rng, w, h, smooth):
    if smooth:  # photo-like gradients; noise is the worst case for clipping
        a = np.cumsum(rng.normal(0, 6, (h, w, 3)), axis=1) + rng.integers(0, 256, (h, 1, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pillow(img, size, box=None):
    if box is not None:
        left, top, w, h = box
        img = img.crop((left, top, left + w, top + h))
    return np.asarray(img.resize(size, Image.BICUBIC))


SIZES = [  # (w, h) -> (out w, out h)
    ((384, 300), (224, 224)),   # the usual: down in both
    ((151, 509), (224, 224)),   # tall: Pillow 13 runs the vertical pass first
    ((56, 242), (2, 65)),       # vertical first with a large horizontal factor too
    ((100, 80), (224, 224)),    # up in both
    ((300, 200), (300, 77)),    # vertical only
    ((300, 200), (91, 200)),    # horizontal only
    ((1, 1), (224, 224)),
    ((7, 1000), (224, 224)),
    ((2000, 3), (224, 224)),
    ((225, 223), (224, 224)),
    ((224, 224), (224, 224)),   # nothing to do: a copy
]


@needs_kernel
@pytest.mark.parametrize("smooth", [False, True])
def test_equals_pillow(smooth):
    rng = np.random.default_rng(0)
    cases = list(SIZES)
    for _ in range(40):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 500, 4))
        cases.append(((w, h), (ow, oh)))
    for (w, h), out in cases:
        img = _image(rng, w, h, smooth)
        got = fast_resize.resize_rgb(img, out)
        assert got is not None and got.shape == (out[1], out[0], 3)
        np.testing.assert_array_equal(got, _pillow(img, out), err_msg=f"{(w, h)} -> {out}")


@needs_kernel
def test_crop_equals_pillow_crop_then_resize():
    rng = np.random.default_rng(1)
    for _ in range(30):
        w, h = (int(v) for v in rng.integers(2, 400, 2))
        img = _image(rng, w, h, smooth=True)
        left, top = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (left, top, int(rng.integers(1, w - left + 1)), int(rng.integers(1, h - top + 1)))
        out = tuple(int(v) for v in rng.integers(1, 300, 2))
        np.testing.assert_array_equal(fast_resize.resize_rgb(img, out, box),
                                      _pillow(img, out, box), err_msg=f"{(w, h)} {box} {out}")


def test_transforms_equal_pillow_on_every_path(monkeypatch):
    """The transforms give Pillow's pixels whether or not the fast path runs: for a non-RGB
    image, an image too large for Pillow to export in one block, and with the kernel off."""
    rng = np.random.default_rng(2)
    small = _image(rng, 320, 240, smooth=True)
    big = Image.new("RGB", (2100, 2100), (10, 200, 30))  # > 16 MB: several blocks
    assert fast_resize.resize_rgb(big, (224, 224)) is None
    assert fast_resize.resize_rgb(small.convert("L"), (224, 224)) is None
    for off in (False, True):
        if off:
            monkeypatch.setattr(fast_resize, "_state", {"fn": None, "why": "test"})
        for img in (small, big):
            np.testing.assert_array_equal(images.resize_square(img, 224),
                                          _pillow(img, (224, 224)))
            got = images.random_resized_crop_flip(img, 224, np.random.default_rng(5))
            r = np.random.default_rng(5)
            box = images.crop_box(img.width, img.height, r)
            want = _pillow(img, (224, 224), box)
            np.testing.assert_array_equal(got, want[:, ::-1] if r.random() < 0.5 else want)


def test_falls_back_to_pillow_when_it_cannot_be_built(monkeypatch, broken_compiler, caplog):
    monkeypatch.setattr(fast_resize, "_state", {})
    assert not fast_resize.available()
    assert "fast resize off" in caplog.text and "/bin/false" in fast_resize._state["why"]
    img = Image.new("RGB", (50, 40), (1, 2, 3))
    assert fast_resize.resize_rgb(img, (224, 224)) is None
    np.testing.assert_array_equal(images.resize_square(img, 224), _pillow(img, (224, 224)))
    assert list(broken_compiler.iterdir()) == []  # no half-written library left behind
