"""mPLUG-Owl3 inference end to end: load_pretrained on a checkpoint with a tokenizer.json,
several images (cut and uncut) and videos per prompt, batched prompts with different media
counts, owl-generate --image / --video; greedy tokens against a full recomputation, on a tiny
Qwen2-style model with tied word embeddings (no lm_head: the greedy screen and the int8
self-draft read the embedding table)."""
import io
import os

import jax
import numpy as np
import pytest
from PIL import Image

import owl_jax
from owl_jax import checkpoint as ckpt
from owl_jax import families
from owl_jax.cli import generate as cli
from owl_jax.generate.config import stop_ids
from owl_jax.generate.cpu import decode_kernels
from owl_jax.families.owl3 import config as owl3_config
from owl_jax.families.owl3 import cut as cut_lib
from owl_jax.families.owl3.processor import build_prompt
from owl_jax.families.owl3.video import Video, load_video, sample_indices
from owl_jax.testing.bpe import write_tokenizer
from owl_jax.testing.models import random_params

O0 = {"xla_backend_optimization_level": 0}
NEW = 6


def _image(seed, h, w):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("owl3_tied"))
    tok_dir = os.path.join(d, "tok")
    write_tokenizer(tok_dir)
    tok = families.get("owl3").load_tokenizer(tok_dir)
    # vocab 4096 (wider than the tokenizer, as Qwen2's table): wide enough for the greedy screen
    cfg = owl3_config.tiny(vocab_size=4096, tie_word_embeddings=True,
                           eos_token_id=tok.eos_id, bos_token_id=tok.bos_id,
                           pad_token_id=tok.pad_id)
    params = random_params(cfg, seed=3)    # embeddings ~ N(0, 1): clear winners
    assert "lm_head" not in params["language_model"]
    out = os.path.join(d, "ckpt")
    ckpt.save_checkpoint(out, jax.tree.map(np.asarray, params), cfg, tokenizer_dir=tok_dir)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def owl(ckpt_dir):
    return owl_jax.load_pretrained(ckpt_dir, compiler_options=O0)


def _recompute(owl, prompts, media, n):
    """Greedy tokens of every prompt by the full forward over the whole sequences at every
    step (one batch, right-padded to one length: one compile)."""
    batch = owl.prepare(prompts, media)
    rows = [list(r[m > 0]) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    length = max(map(len, rows)) + n
    out = [[] for _ in rows]
    for _ in range(n):
        ids = np.full((len(rows), length), owl.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = 1
        logits = owl.logits({"input_ids": ids, "attention_mask": mask,
                             "pixel_values": batch["pixel_values"]})
        for b, r in enumerate(rows):
            if out[b] and out[b][-1] == owl.config.text.eos_token_id:
                continue
            t = int(np.argmax(logits[b, len(r) - 1]))
            out[b].append(t)
            r.append(t)
    return out


def test_tied_checkpoint_loads_with_its_tokenizer(owl):
    assert type(owl.tokenizer).__name__ == "HFTokenizer"
    assert owl.config.text.tie_word_embeddings
    if owl.generator.decode_kernels and decode_kernels.available():
        # plain greedy reads the screen and one prompt the int8 self-draft (tied: no lm_head)
        assert owl.generator.draft_limit(4) == 4
        assert "lm_head" not in owl.generator._with_self_draft()["self_draft"]
        screen = owl.generator._call_params["greedy_screen"]
        np.testing.assert_array_equal(
            np.asarray(screen["head"]),
            np.asarray(owl.params["language_model"]["embed_tokens"]["embedding"]).T)


def test_generation_stops_at_im_end_and_endoftext(owl, ckpt_dir):
    """As the official `generate` (terminators <|endoftext|> and <|im_end|>), kept through a
    checkpoint's config.json; an official config naming a list of eos ids stops at all."""
    tok = owl.tokenizer
    want = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}
    assert set(stop_ids(owl.config.text).tolist()) - {-1} == want
    d = owl3_config.to_dict(owl.config)
    assert owl3_config.from_dict(d).text == owl.config.text
    listed = owl3_config.from_dict({**d, "eos_token_id": [7, 9], "bos_token_id": 5}).text
    assert (listed.eos_token_id, listed.stop_token_ids) == (7, (9, 5))


def test_batched_media_greedy_equals_recomputation(owl):
    cat, wide, tall = _image(0, 40, 40), _image(1, 30, 90), _image(2, 80, 25)
    prompts = [build_prompt("Compare them.", 2),               # two images: one view each
               build_prompt("What is in the image?", 1),       # one image: cut (tiles + global)
               build_prompt("Say something."),                 # no image
               build_prompt("Describe the video.", n_videos=1)]
    media = [[cat, wide], [tall], [], [Video([cat, wide, tall])]]
    outs = owl.generate(prompts, media, max_new_tokens=NEW)
    rows, cols = cut_lib.choose_grid(80, 25, owl.config.image_size)
    assert owl.prepare(prompts[1], media[1])["pixel_values"].shape[0] == rows * cols + 1 > 2
    for g, want in zip(outs, _recompute(owl, prompts, media, NEW)):
        assert g.token_ids == want
        assert g.text == owl.tokenizer.decode(g.token_ids)
    # one prompt: the int8 self-draft (where it runs) gives the same tokens
    one = owl.generate(prompts[1], media[1], max_new_tokens=NEW)
    assert one.token_ids == outs[1].token_ids


def _write_video(path, frames, fps):
    import av
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_file_frames(tmp_path):
    pytest.importorskip("av")
    # 40 flat frames at 4 fps, frame k of brightness 6k: 10 one-a-second frames
    # (0, 4, ..., 36), 4 kept: gap 2.5, items 1, 3, 6, 8
    frames = [np.full((32, 48, 3), 6 * k, np.uint8) for k in range(40)]
    path = str(tmp_path / "clip.mp4")
    _write_video(path, frames, 4)
    video = load_video(path, max_frames=4)
    keep = sample_indices(40, 4.0, 4)
    assert keep == [4, 12, 24, 32]
    assert len(video) == 4
    for k, img in zip(keep, video.frames):
        assert img.size == (48, 32)
        assert abs(np.asarray(img, np.float32).mean() - 6 * k) < 3
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(str(tmp_path / "nope.mp4"))


def test_owl_generate_cli_images_and_video(ckpt_dir, owl, tmp_path):
    pytest.importorskip("av")
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    _image(5, 40, 60).save(a)
    _image(6, 50, 30).save(b)
    clip = str(tmp_path / "clip.mp4")
    _write_video(clip, [np.full((28, 28, 3), 20 * k, np.uint8) for k in range(6)], 2)
    out = io.StringIO()
    rc = cli.main(["--ckpt", ckpt_dir, "--image", a, "--image", b, "--video", clip,
                   "--prompt", "Compare.", "--max_new_tokens", str(NEW), "--no_stream"],
                  stdout=out)
    assert rc == 0
    want = owl.generate(build_prompt("Compare.", 2, n_videos=1),
                        [Image.open(a), Image.open(b), load_video(clip)], max_new_tokens=NEW)
    assert out.getvalue() == want.text + "\n"
    assert cli.main(["--ckpt", ckpt_dir, "--video", str(tmp_path / "none.mp4"),
                     "--prompt", "x"]) == 2
