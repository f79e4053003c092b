"""Processor: images exactly as upstream's PIL resize + CLIPImageProcessor, prompts batched
with EOS padding."""
import io

import numpy as np
import pytest
from PIL import Image

from owl_jax.encoders.vit import CLIP_MEAN, CLIP_STD
from owl_jax.families.owl1.config import tiny
from owl_jax.families.owl1.processor import Processor, load_image, open_image, preprocess_image
from owl_jax.testing.spm import train_tiny_tokenizer
from owl_jax.families.owl1.template import build_prompt
from owl_jax.tokenizer import OwlTokenizer

S = 28


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tiny_tokenizer(d)
    return OwlTokenizer.from_dir(d)


def _rgb(h=37, w=53, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _numpy_ref(resized: Image.Image) -> np.ndarray:
    """Independent re-derivation in float64: u8 / 255, minus mean, over std."""
    u = np.asarray(resized.convert("RGB"), np.float64)
    return (u / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)


def test_preprocess_matches_numpy_and_clip_image_processor():
    from transformers import CLIPImageProcessor
    img = _rgb()
    out = preprocess_image(img, S, CLIP_MEAN, CLIP_STD)
    assert out.shape == (S, S, 3) and out.dtype == np.float32
    resized = img.resize((S, S), Image.BICUBIC)  # straight to the square, aspect not kept
    np.testing.assert_allclose(out, _numpy_ref(resized), atol=1e-6)
    clip = CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                              do_resize=False, do_center_crop=False)
    ref = clip(resized, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.array_equal(out, ref)  # bit-exact


@pytest.mark.parametrize("mode", ["P", "1"])
def test_palette_and_bilevel_are_resized_before_rgb(mode):
    img = _rgb(seed=1).convert(mode)
    out = preprocess_image(img, S, CLIP_MEAN, CLIP_STD)
    # Upstream: img.resize(..., BICUBIC) on the P/1 image (PIL makes it NEAREST), then RGB.
    nearest_then_rgb = img.convert("RGB").resize((S, S), Image.NEAREST)
    np.testing.assert_allclose(out, _numpy_ref(nearest_then_rgb), atol=1e-6)
    rgb_then_bicubic = img.convert("RGB").resize((S, S), Image.BICUBIC)
    assert np.abs(out - _numpy_ref(rgb_then_bicubic)).max() > 0.1


def test_gray_and_rgba_images():
    gray = _rgb(seed=2).convert("L")
    out = preprocess_image(gray, S, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(out, _numpy_ref(gray.resize((S, S), Image.BICUBIC)), atol=1e-6)
    rgba = _rgb(seed=3).convert("RGBA")
    out = preprocess_image(rgba, S, CLIP_MEAN, CLIP_STD)
    np.testing.assert_allclose(out, _numpy_ref(rgba.resize((S, S), Image.BICUBIC)), atol=1e-6)


def test_load_image_paths_bytes_and_corrupt(tmp_path):
    img = _rgb(seed=4)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    for src in (buf.getvalue(), str(tmp_path / "a.png"), np.asarray(img)):
        loaded = load_image(src)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(img))
    assert open_image(_rgb().convert("P")).mode == "P"  # kept for preprocess_image
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(b"not an image")
    missing = tmp_path / "missing.png"
    for src in (str(missing), missing):
        with pytest.raises(ValueError) as e:
            load_image(src)
        assert str(e.value) == f"image file not found: {missing}"
    (tmp_path / "not_an_image.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*not_an_image.png"):
        load_image(str(tmp_path / "not_an_image.png"))


def test_processor_batch(tok):
    cfg = tiny(vocab_size=tok.vocab_size)
    proc = Processor(tok, cfg)
    prompts = [build_prompt("What is this?", 1), build_prompt("Compare the two.", 2),
               build_prompt(["Hi", "Hello", "Say more."], 0)]
    images = [[_rgb(seed=5)], [_rgb(seed=6), _rgb(seed=7)], []]
    out = proc(prompts, images)
    ids, mask, pv = out["input_ids"], out["attention_mask"], out["pixel_values"]
    rows = [tok.encode_prompt(p, cfg.image_tokens) for p in prompts]
    assert ids.dtype == np.int32 and ids.shape == (3, max(map(len, rows)))
    for b, r in enumerate(rows):
        assert ids[b, :len(r)].tolist() == r
        assert (ids[b, len(r):] == tok.eos_id).all()  # right-padded with EOS as upstream
        assert mask[b].tolist() == [1] * len(r) + [0] * (ids.shape[1] - len(r))
    assert pv.shape == (3, S, S, 3)
    for k, img in enumerate(images[0] + images[1]):  # flat, in order of appearance
        assert np.array_equal(pv[k], preprocess_image(img, S, CLIP_MEAN, CLIP_STD))
    assert (ids == -1).sum() == 3 * cfg.image_tokens


def test_processor_image_count_mismatch_names_the_prompt(tok):
    proc = Processor(tok, tiny(vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="prompt 1 has 2 <image> but 1 images"):
        proc([build_prompt("a", 1), build_prompt("b", 2)], [[_rgb()], [_rgb()]])
    out = proc(build_prompt("text only", 0))
    assert out["pixel_values"].shape == (0, S, S, 3)
