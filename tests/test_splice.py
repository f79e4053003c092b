"""Splicing image tokens into reserved slots, including the official fixed 65-slot runs."""
import numpy as np

from owl_jax.layers.splice import splice_images


def _expected(text, ids, images, slots):
    """Loop form of the official splice: runs in order of appearance, first T slots filled."""
    out = text.copy()
    n = 0
    for b in range(ids.shape[0]):
        i = 0
        while i < ids.shape[1]:
            if ids[b, i] < 0:
                t = images.shape[1]
                out[b, i:i + t] = images[n]
                n, i = n + 1, i + slots
            else:
                i += 1
    return out


def test_flat_and_official_slot_runs():
    rng = np.random.default_rng(0)
    t, d = 3, 4
    for slots in (3, 7):  # runs as long as the image, and longer (official 65 with few queries)
        run = [-1] * slots
        ids = np.array([[1, 5] + run + [6] + run + [7],
                        [1, 2] + run + [8] * (slots + 2)])
        images = rng.normal(size=(3, t, d)).astype(np.float32)
        text = rng.normal(size=ids.shape + (d,)).astype(np.float32)
        got = np.asarray(splice_images(text, ids, images, slots))
        np.testing.assert_array_equal(got, _expected(text, ids, images, slots))
        # Per-row form: row 0 holds images 0, 1; row 1 holds image 2 (plus one padding image).
        rows = np.stack([images[:2], np.stack([images[2], np.zeros_like(images[2])])])
        np.testing.assert_array_equal(np.asarray(splice_images(text, ids, rows, slots)), got)
