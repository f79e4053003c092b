"""mPLUG-Owl3's tokenizer and processor against transformers' Qwen2 tokenizer and the official
processor's outputs (tests/golden/owl3/processor, made by make_processor_golden.py)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax import families
from owl_jax.families.owl3 import config as owl3_config
from owl_jax.families.owl3 import cut as cut_lib
from owl_jax.families.owl3.processor import Owl3Processor, build_prompt
from owl_jax.families.owl3.video import Video, sample_indices, uniform
from owl_jax.hf_tokenizer import HFTokenizer
from owl_jax.testing.bpe import write_tokenizer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "owl3", "processor")
TEXTS = [
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|image|>\nWhat is in the image?"
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|video|> <|start_cut|>2*3\n<|image|> <|image|>\n<|image|><|end_cut|>",
    "Ünïcödé  text\twith 🙂 emoji,\r\n\n numbers 1234 and 'll 're.<|endoftext|>",
    "unseen words: zebra-quokka-xylophone!!! ??",
    "",
]


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "cases.npz")))


@pytest.fixture(scope="module")
def tok():
    return families.get("owl3").load_tokenizer(GOLDEN)


def test_tokenizer_matches_transformers_qwen2(tmp_path):
    from transformers import AutoTokenizer
    write_tokenizer(str(tmp_path))
    ours = families.get("owl3").load_tokenizer(str(tmp_path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ref).__name__.startswith("Qwen2Tokenizer")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert ours.encode(name) == [ref.convert_tokens_to_ids(name)]
    # the media markers are ordinary text: several BPE tokens, as with Qwen2's own file
    for marker in ("<|image|>", "<|video|>", "<|start_cut|>"):
        assert len(ours.encode(marker)) > 1 and ours.encode(marker) == ref(marker).input_ids
    assert (ours.eos_id, ours.pad_id) == (ref.eos_token_id, ref.pad_token_id)
    assert ours.bos_id == ours.token_id("<|endoftext|>")   # config.json's bos_token_id
    assert ours.vocab_size == len(ref)
    # ids past the vocabulary (a larger embedding table) and media slots decode to nothing
    assert ours.decode([ours.vocab_size + 5, -3] + ours.encode("a cat")) == "a cat"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        families.get("owl3").load_tokenizer(str(tmp_path))
    write_tokenizer(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|nope|>"}, f)
    with pytest.raises(ValueError, match="eos token '<\\|nope\\|>'"):
        HFTokenizer.from_dir(str(tmp_path))


def test_anchor_choice_matches_official(golden):
    for size in (378, 384, 28):
        ours = [cut_lib.ANCHORS.index(cut_lib.choose_grid(int(h), int(w), size))
                for h, w in golden["sizes"]]
        np.testing.assert_array_equal(ours, golden[f"anchors_{size}"], err_msg=str(size))


def _proc(tok, version="240728", cut=None):
    cfg = owl3_config.tiny(vocab_size=512, version=version)
    assert cfg.image_size == 28
    return Owl3Processor(tok, cfg, cut=cut)


def _images(golden):
    return [Image.fromarray(golden[f"image_{k}"]) for k in range(4)]


def test_cut_pixels_match_official(golden, tok):
    proc = _proc(tok)
    views, shapes = [], []
    for img in _images(golden):
        v, grid = proc.cut_image(img)
        views.append(v)
        shapes += [grid, (1, 1)]
    np.testing.assert_array_equal(shapes, golden["cut_shape"])
    ours = np.concatenate(views).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, golden["pixels_cut"], rtol=0, atol=1e-6)
    glob = np.stack([proc.image(img) for img in _images(golden)]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(glob, golden["pixels_global"], rtol=0, atol=1e-6)


def _media_offset(ids):
    """Column 1 of the official media_offset from our ids: slots (negative) before each j."""
    starts = np.nonzero(ids < 0)[0]
    return (np.arange(len(ids))[:, None] > starts[None, :]).sum(1)


@pytest.mark.parametrize("case", ["one_cut", "turns_cut", "two_global", "video"])
def test_processor_matches_official(golden, tok, case):
    imgs = _images(golden)
    if case == "one_cut":
        prompt, media, views = build_prompt("What is in the image?", 1), [imgs[0]], slice(0, 4)
    elif case == "turns_cut":
        prompt = build_prompt([("system", "Be brief."), ("user", "<|image|>Describe it."),
                               ("assistant", "A gradient."), ("user", "And the colours?")])
        media, views = [imgs[1]], slice(4, 9)
    elif case == "two_global":
        prompt = build_prompt("Compare the two images.", 2)
        media, views = imgs[2:4], None
    else:
        prompt = build_prompt("Describe the video.", n_videos=1)
        media, views = [Video(imgs[:3])], None
    batch = _proc(tok)(prompt, media)       # cut=None: the official default per prompt
    ids = batch["input_ids"][0]
    want = golden[f"{case}/input_ids"][0]
    np.testing.assert_array_equal(np.where(ids < 0, -1 - ids, ids), want)
    np.testing.assert_array_equal(_media_offset(ids), golden[f"{case}/media_offset"][0, :, 1])
    px = batch["pixel_values"].transpose(0, 3, 1, 2)
    expect = (golden["pixels_cut"][views] if views is not None else
              golden["pixels_global"][2:4] if case == "two_global" else golden["pixels_global"][:3])
    np.testing.assert_allclose(px, expect, rtol=0, atol=1e-6)


def test_241101_cut_and_video_text(golden, tok):
    """241101 (no official torch processor): the v3 cut text and the video span, as the
    release's processor writes them (fact sheet, PaddleMIX port), one slot per view."""
    proc = _proc(tok, version="241101")
    imgs = _images(golden)
    text, views = proc.expand("<|image|>A<|video|>B<|image|>", [imgs[0], Video(imgs[:2]), imgs[2]])
    assert text == ("<|start_cut|>1*3\n<|image|> <|image|> <|image|>\n<|image|><|end_cut|>A"
                    "<|start_video_frame|><|image|><|image|><|end_video_frame|>B"
                    "<|start_cut|>2*2\n<|image|> <|image|>\n<|image|> <|image|>\n"
                    "<|image|><|end_cut|>")
    assert len(views) == 4 + 2 + 5
    assert sum(i < 0 for i in proc.encode(text)) == len(views)
    # 240728 cuts one image per prompt only; cut=False: one view per image
    assert len(_proc(tok).expand("<|image|><|image|>", imgs[:2])[1]) == 2
    assert len(_proc(tok, cut=False).expand("<|image|>", imgs[:1])[1]) == 1
    assert len(_proc(tok, cut=True).expand("<|image|><|image|>", imgs[:2])[1]) == 4 + 5


def test_processor_errors(golden, tok):
    proc = _proc(tok)
    imgs = _images(golden)
    with pytest.raises(ValueError, match="2 media placeholders .* 1 images"):
        proc("<|image|><|image|>", [imgs[0]])
    with pytest.raises(ValueError, match="is <\\|image\\|> but media 0 is a video"):
        proc("<|image|>", [Video(imgs[:2])])
    with pytest.raises(ValueError, match="is <\\|video\\|> but media 0 is a Image"):
        proc("<|video|>", [imgs[0]])


def test_frame_sampling():
    # one frame a second, then at most max_frames of them, uniformly (the official formula)
    assert sample_indices(100, 25.0, 16) == [0, 25, 50, 75]
    assert sample_indices(10, 29.97, 16) == [0]
    idx = sample_indices(3000, 10, 16)          # 300 one-a-second frames -> 16
    gap = 300 / 16
    assert idx == [10 * int(i * gap + gap / 2) for i in range(16)]
    assert uniform(list(range(5)), 5) == [0, 1, 2, 3, 4]
