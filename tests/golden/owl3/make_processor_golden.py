"""Makes tests/golden/owl3/processor/cases.npz: what the official mPLUG-Owl3 (240728) processor
makes of small synthetic images, prompts and a video.

Not run by the test suite. Run it out of the repo's environment, with the official code in
OWL3_CODE (as make_golden.py), under transformers 4.37.2, torch and torchvision (CPU):

    OWL3_CODE=/path/to/mPLUG-Owl3-7B-240728 python tests/golden/owl3/make_processor_golden.py

It reads the tiny tokenizer next to it (tokenizer.json, written by
`owl_jax.testing.bpe.write_tokenizer`) and writes:
- anchors_<S>: the anchor index `anchor_rank` picks for every (H, W) of `SIZES` at tile size S
  (378, 384 and 28);
- image_<k>: the uint8 test images; pixels_cut / cut_shape: `mPLUGOwl3ImageProcessor(28)` on
  them with cutting (tiles + global view, NCHW);
- per processor case <name>: input_ids and media_offset of `mPLUGOwl3Processor` (its
  pixel_values are slices of pixels_cut / pixels_global, asserted here).
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_golden import _load_torchvision  # noqa: E402  (also puts OWL3_CODE on sys.path)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import image_processing_mplugowl3 as ipm  # noqa: E402
from processing_mplugowl3 import mPLUGOwl3Processor  # noqa: E402

OUT = os.path.join(HERE, "processor")
SIZES = [(h, w) for h in (1, 7, 20, 28, 50, 100, 201, 378, 384, 500, 777, 1000, 1600)
         for w in (1, 5, 20, 33, 64, 100, 333, 378, 384, 640, 1000, 1234, 2000)]
IMAGE_SHAPES = [(30, 70), (90, 20), (50, 50), (33, 100)]   # (H, W)
S = 28


def images():
    rng = np.random.RandomState(0)
    out = []
    for h, w in IMAGE_SHAPES:   # smooth gradients plus noise: resizing has something to do
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                         (x + y) * 255 // (h + w)], -1)
        out.append(np.clip(base + rng.randint(-40, 40, base.shape), 0, 255).astype(np.uint8))
    return out


def anchor_table(size):
    anchors = ipm.grid_dict["grid_squ_6"]
    resizer = ipm.AnchorResize((size, size), anchors)
    picks = [int(ipm.anchor_rank(resizer.anchors, resizer.anchor_areas, hw)) for hw in SIZES]
    return np.asarray(picks, np.int32)


def main():
    out = {"sizes": np.asarray(SIZES, np.int32)}
    for size in (378, 384, S):
        out[f"anchors_{size}"] = anchor_table(size)
    arrays = images()
    pils = [Image.fromarray(a) for a in arrays]
    for k, a in enumerate(arrays):
        out[f"image_{k}"] = a
    improc = ipm.mPLUGOwl3ImageProcessor(image_size=S)
    feat = improc(pils, cut_enable=True, return_tensors=None)
    out["pixels_cut"] = feat["pixel_values"].numpy().astype(np.float32)
    out["cut_shape"] = np.asarray(feat["cut_shape"], np.int32)
    feat = improc(pils, cut_enable=False, return_tensors=None)
    out["pixels_global"] = feat["pixel_values"].numpy().astype(np.float32)

    tok = AutoTokenizer.from_pretrained(OUT)
    proc = mPLUGOwl3Processor(image_processor=improc, tokenizer=tok)
    cases = {
        # one image, cut (the official default)
        "one_cut": (["<|image|>\nWhat is in the image?"], [pils[0]], None, True),
        # a system turn, a conversation, one tall image, cut
        "turns_cut": ([("system", "Be brief."), ("user", "<|image|>Describe it."),
                       ("assistant", "A gradient."), ("user", "And the colours?")],
                      [pils[1]], None, True),
        # two images, one view each (cut_enable=False: 240728's multi-image prompts)
        "two_global": (["<|image|><|image|>\nCompare the two images."], pils[2:4], None, False),
        # a video of three frames (frames are never cut)
        "video": (["<|video|>\nDescribe the video."], None, [pils[:3]], True),
    }
    pixels = {}
    for name, (turns, imgs, videos, cut) in cases.items():
        if isinstance(turns[0], str):
            messages = [{"role": "user", "content": turns[0]}]
        else:
            messages = [{"role": r, "content": c} for r, c in turns]
        messages.append({"role": "assistant", "content": ""})
        got = proc(messages, images=imgs, videos=videos, cut_enable=cut)
        out[f"{name}/input_ids"] = got["input_ids"].numpy().astype(np.int32)
        out[f"{name}/media_offset"] = got["media_offset"].numpy().astype(np.int32)
        pixels[name] = got["pixel_values"].numpy()
    # the cases' pixels are views of pixels_cut / pixels_global (checked here, not stored)
    counts = [h * w + 1 for h, w in out["cut_shape"][0::2]]
    first = np.cumsum([0] + counts)
    assert np.array_equal(pixels["one_cut"], out["pixels_cut"][first[0]:first[1]])
    assert np.array_equal(pixels["turns_cut"], out["pixels_cut"][first[1]:first[2]])
    assert np.array_equal(pixels["two_global"], out["pixels_global"][2:4])
    assert np.array_equal(pixels["video"], out["pixels_global"][:3])
    np.savez_compressed(os.path.join(OUT, "cases.npz"), **out)
    print({k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
