"""mPLUG-Owl3 training: samples laid out as its processor's training mode (`build_text_qwen`'s
chunks and labels, re-derived here by hand), interleaved / video records, the data pipeline's
packed rows (images stay with their sample), and packed rows whose samples each get the logits
they get alone."""
import fnmatch
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from owl_jax import families
from owl_jax.data import packing
from owl_jax.data.conversation import InstructionReader, sample_frames
from owl_jax.families.owl3 import samples
from owl_jax.families.owl3.model import Owl3, media_id
from owl_jax.testing.models import FAST, random_params
from owl_jax.tokenizer import OwlTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return OwlTokenizer.from_dir(tokenizer_dir)


def expected(tok, chunks):
    """The official encode_text_sft: every chunk tokenized on its own, its label per token;
    a placeholder's first token marked as the media slot."""
    ids, labels = [], []
    for text, label in chunks:
        enc = tok.encode(text) if text else []
        if text == "<|image|>":
            enc = [media_id(enc[0])] + enc[1:]
        ids += enc
        labels += [label] * len(enc)
    return ids, labels


def test_conversation_in_the_chat_template(tok):
    conv = InstructionReader("llava").parse(
        {"image": ["a.jpg"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]})
    sample, reason = samples.conversation(tok, conv, 500, 1)
    assert reason == "" and sample["num_images"] == 1
    ids, labels = expected(tok, [
        ("<|im_start|>system\n<|im_end|>", 0), ("\n<|im_start|>user\n", 0), ("<|image|>", 0),
        ("\nWhat is it?<|im_end|>", 0), ("\n<|im_start|>assistant\n", 0),
        ("A cat.<|im_end|>", 1), ("<|endoftext|>", 1), ("\n<|im_start|>user\nColour?<|im_end|>", 0),
        ("\n<|im_start|>assistant\n", 0), ("Black.<|im_end|>", 1), ("<|endoftext|>", 1)])
    assert sample["input_ids"].tolist() == ids
    # loss_mask[i] trains ids[i + 1]
    assert sample["loss_mask"].tolist() == [float(x) for x in labels[1:]] + [0.0]
    # cut: the sample ends where seq_len + 1 ids end, the answer partly trained
    cut, _ = samples.conversation(tok, conv, len(ids) - 8, 1)
    assert cut["input_ids"].tolist() == ids[:len(ids) - 7]


def test_interleaved_and_video_records(tok):
    reader = InstructionReader("interleave")
    conv = reader.parse({"image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "First <image> then <image>: which is larger?"},
        {"from": "gpt", "value": "The second."}]})
    sample, _ = samples.conversation(tok, conv, 500, 1)
    ids, _ = expected(tok, [
        ("<|im_start|>system\n<|im_end|>", 0), ("\n<|im_start|>user\nFirst ", 0),
        ("<|image|>", 0), (" then ", 0), ("<|image|>", 0),
        (": which is larger?<|im_end|>", 0), ("\n<|im_start|>assistant\n", 0),
        ("The second.<|im_end|>", 1), ("<|endoftext|>", 1)])
    assert sample["input_ids"].tolist() == ids and sample["num_images"] == 2
    frames = [f"f{i}.jpg" for i in range(40)]
    video = reader.parse({"video": frames, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Rain."}]})
    assert list(video.images) == sample_frames(frames) and len(video.images) == 16
    assert video.images[:2] == ("f1.jpg", "f3.jpg")  # int(i * 2.5 + 1.25)
    s, _ = samples.conversation(tok, video, 500, 1)
    assert s["num_images"] == 16 and int((s["input_ids"] < 0).sum()) == 16
    # a record whose tags and images disagree is skipped and counted
    assert reader.parse({"image": ["a.jpg"], "conversations": [
        {"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]}) is None
    assert reader.skipped["image_count_mismatch"] == 1


def test_caption_layouts(tok):
    s, _ = samples.caption(tok, " A dog. ", 300, 1)
    ids, labels = expected(tok, [("<|image|>", 0), ("A dog.", 1), ("<|endoftext|>", 1)])
    assert s["input_ids"].tolist() == ids and s["num_images"] == 1
    s, _ = samples.caption(tok, "A dog.", 300, 1, prompt="Describe.", template="owl3_chat")
    ids, _ = expected(tok, samples.chat_chunks([("user", "<|image|>\nDescribe."),
                                                ("assistant", "A dog.")]))
    assert s["input_ids"].tolist() == ids
    assert samples.caption(tok, "", 100, 1) == (None, "empty_text")
    with pytest.raises(ValueError, match="template"):
        samples.caption(tok, "x", 100, 1, template="vicuna_v1")


def _pixels(seed, n, s):
    return np.random.default_rng(seed).standard_normal((n, s, s, 3)).astype(np.float32)


@pytest.mark.parametrize("version", ["240728", "241101"])
def test_packed_samples_get_the_logits_they_get_alone(tok, version):
    """Two conversations with images packed into one row (the data pipeline's packer): each
    segment's logits equal the sample's own, unpacked; the images of one never reach the
    other (without segment ids they do)."""
    cfg = families.get("owl3").tiny(vocab_size=384, version=version)
    params = random_params(cfg, seed=7)
    model = Owl3(cfg)
    reader = InstructionReader("interleave")
    convs = [reader.parse({"image": ["a", "b"], "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Both."}]}),
        reader.parse({"image": ["c"], "conversations": [
            {"from": "human", "value": "Say <image>"}, {"from": "gpt", "value": "Cat."}]})]
    smp = [samples.conversation(tok, c, 150, 1)[0] for c in convs]
    s = cfg.vision.image_size
    px = [_pixels(1, 2, s), _pixels(2, 1, s)]
    for sm, p in zip(smp, px):
        sm["images"] = p
    row = packing.build_row(smp, 300, 4, s)
    assert row["segment_ids"].max() == 2
    fwd = jax.jit(lambda ids, pv, seg, pos: model.apply({"params": params}, ids, pv, seg, pos),
                  compiler_options=FAST)
    packed = np.asarray(fwd(row["input_ids"][None], row["pixel_values"][None],
                            row["segment_ids"][None], row["positions"][None]))[0]
    as_one = np.asarray(fwd(row["input_ids"][None], row["pixel_values"][None],
                            (row["segment_ids"][None] > 0).astype(np.int32),
                            np.arange(300, dtype=np.int32)[None]))[0]
    one = jax.jit(lambda ids, pv: model.apply({"params": params}, ids, pv),
                  compiler_options=FAST)
    start = 0
    for k, (sm, p) in enumerate(zip(smp, px)):
        n = len(sm["input_ids"]) - 1
        alone = np.asarray(one(sm["input_ids"][None, :n], p[None]))[0]
        np.testing.assert_allclose(packed[start:start + n], alone, atol=2e-5, rtol=1e-5,
                                   err_msg=f"sample {k}")
        if k:  # one sequence: the second sample reads the first one's images and text
            assert np.abs(as_one[start:start + n] - alone).max() > 1e-3
        start += n


def test_pipeline_packs_owl3_rows_with_their_images(tmp_path, tok):
    """Multi-image and video records through the data pipeline with packing: each row's
    media slots read its own samples' images in order, and its loss mask is the samples'."""
    from owl_jax.data.pipeline import make_train_iterator
    cfg = families.get("owl3").tiny(vocab_size=384)
    s = cfg.vision.image_size
    os.makedirs(tmp_path / "img")
    colours = {}
    for i in range(8):
        colours[f"{i}.png"] = (30 * i, 255 - 30 * i, 100)
        Image.new("RGB", (s, s), colours[f"{i}.png"]).save(tmp_path / "img" / f"{i}.png")
    records = [
        {"image": ["0.png", "1.png"], "conversations": [
            {"from": "human", "value": "<image> or <image>?"}, {"from": "gpt", "value": "Left."}]},
        {"video": ["2.png", "3.png", "4.png"], "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"},
            {"from": "gpt", "value": "A car."}]},
        {"image": ["5.png"], "conversations": [
            {"from": "human", "value": "<image>\nName it."}, {"from": "gpt", "value": "Tree."}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    spec = f"instruct:{tmp_path}/d.json?images={tmp_path}/img&format=interleave"
    it = make_train_iterator(dict(sources=[dict(spec=spec)], seq_len=420, batch_size=1,
                                  packing=True, max_images_per_row=6, workers=0, threads=1,
                                  num_epochs=1, seed=0, augment=False, template="owl3_chat"),
                             tok, cfg, 0, 1)
    batches = list(it)
    convs = {}
    for c in InstructionReader("interleave", image_root=str(tmp_path / "img"))(records):
        smp = samples.conversation(tok, c, 420, 1)[0]
        convs[tuple(smp["input_ids"][:-1].tolist())] = (smp, c.images)
    seen = 0
    for b in batches:
        ids, seg, pv = b["input_ids"][0], b["segment_ids"][0], b["pixel_values"][0]
        slot = 0
        for k in range(1, seg.max() + 1):
            where = np.nonzero(seg == k)[0]
            smp, paths = convs[tuple(ids[where].tolist())]
            np.testing.assert_array_equal(b["loss_mask"][0, where], smp["loss_mask"][:-1])
            for p in paths:  # this sample's images, in its order, at the row's next slots
                colour = colours[os.path.basename(p)]
                assert tuple(pv[slot, 0, 0]) == colour, (k, p)
                slot += 1
            seen += 1
        assert slot == int((ids < 0).sum()) and not pv[slot:].any()
    assert seen == 3 and any(b["segment_ids"].max() > 1 for b in batches)


def test_remat_gives_the_same_gradients_and_scan_is_refused():
    """Rematerialised hyper and SigLIP layers (the recipes' `full`) give the plain gradients;
    scanning a decoder with hyper layers is refused with a clear error."""
    cfg = families.get("owl3").tiny(vocab_size=384)
    params = random_params(cfg, seed=3)
    s = cfg.vision.image_size
    ids = np.array([[5, media_id(7), 9, 11, media_id(7), 9, 13, 17, 19]], np.int32)
    pv = _pixels(4, 2, s)[None]

    def grads(policy):
        model = Owl3(cfg, remat_policy=policy)
        f = lambda p: (model.apply({"params": p}, ids, pv) ** 2).mean()  # noqa: E731
        return jax.jit(jax.grad(f), compiler_options=FAST)(params)
    plain, remat = grads("none"), grads("full")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert np.abs(np.asarray(plain["language_model"]["layers_0"]["self_attn"]["v_kv_proj"]
                             ["kernel"])).max() > 0  # the images reach the loss
    with pytest.raises(ValueError, match="scan_layers"):
        Owl3(cfg, scan_layers=True).init(jax.random.key(0), ids, pv)


def test_image_flops_count_every_hyper_layers_kv_projection():
    """The trainer's FLOP accounting per image: SigLIP, the projector, and the v_kv_proj of
    every hyper layer (2 x features x its kernel's size, from the initialised params)."""
    fam = families.get("owl3")
    cfg = fam.tiny(vocab_size=384)
    shapes = nn.unbox(jax.eval_shape(lambda: Owl3(cfg).init(jax.random.key(0),
                                                           *fam.dummy_inputs(cfg))))
    lm = shapes["params"]["language_model"]
    kernels = sum(int(np.prod(lm[f"layers_{i - 1}"]["self_attn"]["v_kv_proj"]["kernel"].shape))
                  for i in cfg.hyper_layers)
    got = {name: (tops, m) for name, tops, m in fam.image_flops(cfg)}
    assert list(got) == ["vision", "projector", "hyper_kv"]
    # its params, by path pattern: exactly the hyper layers' v_kv_proj and gate
    paths = ["/".join(str(k.key) for k in kp)
             for kp, _ in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]]
    owned = [p for p in paths if any(fnmatch.fnmatchcase(p, o) for o in got["hyper_kv"][0])]
    assert owned and all(p.split("/")[3] in ("v_kv_proj", "gate_proj") for p in owned)
    assert len(owned) == 4 * len(cfg.hyper_layers)   # kernel and bias of each
    assert got["hyper_kv"][1].weights == 2 * cfg.tokens_per_image * kernels
