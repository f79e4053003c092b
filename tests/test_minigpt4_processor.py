"""MiniGPT-4's processor, templates and training samples against re-derivations of its code
(reference notes 2.6, 2.7): prompts as its Chat renders them, ids as `get_context_emb` calls
the slow LLaMA tokenizer (transformers' sentencepiece backend, legacy), the eval / train
image transforms with Pillow, and the stage-1 / stage-2 layouts of `MiniGPT4.forward`."""
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import images
from owl_jax.families.minigpt4 import config as mg_config, samples, templates
from owl_jax.families.minigpt4.processor import MiniGPT4Processor
from owl_jax.testing.spm import default_corpus, train_tiny_tokenizer
from owl_jax.tokenizer import OwlTokenizer

CFG = mg_config.tiny(vocab_size=512)
T, S = CFG.image_tokens, CFG.image_size


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    texts = default_corpus() + [templates.SYSTEM] * 3 + [
        "###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
        "A dog on the grass.###"] * 3
    train_tiny_tokenizer(d, texts=texts)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return OwlTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    """The slow LLaMA tokenizer as MiniGPT-4 calls it (legacy; BOS only when asked)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=os.path.join(tok_dir, "tokenizer.model"),
                                legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", special_tokens_pattern="bos")


def ref_context_ids(hf, prompt):
    """`Chat.get_context_emb`: split on <ImageHere>, segment 0 with BOS, the rest without."""
    out = []
    for i, seg in enumerate(prompt.split("<ImageHere>")):
        if i:
            out += [-1] * T
        out += hf(seg, add_special_tokens=(i == 0)).input_ids
    return out


def test_prompts_as_the_chat_renders_them():
    sys = templates.SYSTEM
    assert templates.build_prompt("What is this?") == \
        sys + "###Human: <Img><ImageHere></Img> What is this?###Assistant:"
    assert templates.build_prompt("q", 2) == (
        sys + "###Human: <Img><ImageHere></Img>###Human: <Img><ImageHere></Img> q###Assistant:")
    assert templates.build_prompt("Hi", 0) == sys + "###Human: Hi###Assistant:"
    assert templates.build_prompt(["What is it?", "A cat.", "Sure?"], 1) == (
        sys + "###Human: <Img><ImageHere></Img> What is it?###Assistant: A cat.###Human: "
              "Sure?###Assistant:")
    assert templates.build_prompt("q", 1, "minigpt4_head").endswith("q###Assistant: ")
    with pytest.raises(ValueError, match="unknown MiniGPT-4 template"):
        templates.build_prompt("q", 1, "vicuna_v1")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_ids_are_get_context_emb(tok, hf, n):
    prompt = templates.build_prompt("What is in the picture?", n)
    proc = MiniGPT4Processor(tok, CFG)
    ids = proc.encode(prompt)
    assert ids == ref_context_ids(hf, prompt)
    assert ids.count(-1) == n * T and ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def _img(h, w, seed, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    img = Image.fromarray(a)
    return img.convert(mode) if mode != "RGB" else img


@pytest.mark.parametrize("h,w,mode", [(53, 37, "RGB"), (31, 64, "RGB"), (S, S, "RGB"),
                                      (45, 29, "P"), (40, 33, "L")])
def test_eval_transform_is_a_plain_bicubic_resize(tok, h, w, mode):
    img = _img(h, w, h * w, mode)
    proc = MiniGPT4Processor(tok, CFG)
    ref = np.asarray(img.convert("RGB").resize((S, S), Image.BICUBIC))
    np.testing.assert_array_equal(proc.pixels(img), ref)
    want = (ref.astype(np.float32) / np.float32(255) - np.float32(CFG.image_mean)) / \
        np.float32(CFG.image_std)
    np.testing.assert_allclose(proc.image(img), want, rtol=0, atol=2e-6)


def test_train_transform_is_random_resized_crop_without_flip(tok):
    img = _img(61, 47, 7)
    proc = MiniGPT4Processor(tok, CFG)
    outs = set()
    for seed in range(6):
        left, top, w, h = images.crop_box(img.width, img.height, np.random.default_rng(seed),
                                          (0.5, 1.0))
        assert w * h >= 0.5 * 61 * 47 * 0.9  # scale 0.5 .. 1 of the area (rounded sides)
        ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((S, S), Image.BICUBIC))
        got = proc.train_pixels(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, ref)
        outs.add(got.tobytes())
    assert len(outs) > 1


def test_batch_pads_and_checks_the_image_count(tok):
    proc = MiniGPT4Processor(tok, CFG)
    p1, p2 = templates.build_prompt("a?", 1), templates.build_prompt("b?", 0)
    out = proc([p1, p2], [[_img(20, 30, 1)], []])
    assert out["pixel_values"].shape == (1, S, S, 3)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (ids[0] < 0).sum() == T and mask[1].sum() == len(proc.encode(p2))
    assert (ids[1][mask[1] == 0] == tok.pad_id).all()
    with pytest.raises(ValueError, match="has 1 <ImageHere> but 0 images"):
        proc([p1], [[]])


def _ref_forward_layout(hf, before, after, text, end_sym, max_txt_len):
    """`MiniGPT4.forward`: [BOS] + before + image + after + text (each its own call, no BOS),
    targets -100 up to the text."""
    bos = hf.convert_tokens_to_ids("<s>")
    head = [bos] + (hf(before, add_special_tokens=False).input_ids if before else []) + \
        [-1] * T + (hf(after, add_special_tokens=False).input_ids if after else [])
    txt = hf(text + end_sym, add_special_tokens=False, truncation=True,
             max_length=max_txt_len).input_ids
    return head + txt, [-100] * len(head) + txt


def _check(sample, ids, targets):
    assert sample["input_ids"].tolist() == ids
    trained = [int(t != -100) for t in targets[1:]] + [0]
    assert sample["loss_mask"].tolist() == trained
    assert sample["num_images"] == 1


def test_stage1_caption_layout(tok, hf):
    raw = "A Dog (running) on the grass!  Near: a tree."
    clean = samples.blip_caption(raw)
    assert clean == "a dog running on the grass near a tree"
    s, reason = samples.caption(tok, raw, 200, T, template="minigpt4_stage1")
    assert reason == ""
    _check(s, *_ref_forward_layout(hf, "", "", clean, "\n", 32))
    long = " ".join(["word"] * 80)
    s, _ = samples.caption(tok, long, 200, T)
    _check(s, *_ref_forward_layout(hf, "", "", samples.blip_caption(long), "\n", 32))
    assert s["loss_mask"].sum() == 32


def test_stage2_alignment_layout(tok, hf):
    cap = "The image shows a red bus. It is parked."
    s, _ = samples.caption(tok, cap, 300, T, template="minigpt4_align")
    prompts = [templates.ALIGN_PROMPT.format(i) for i in templates.ALIGN_INSTRUCTIONS]
    refs = []
    for p in prompts:
        before, _, after = p.partition("<ImageHere>")
        refs.append(_ref_forward_layout(hf, before, after, cap, "###", 160))
    match = [r for r in refs if r[0] == s["input_ids"].tolist()]
    assert len(match) == 1
    _check(s, *match[0])
    # the choice spreads over the four instructions
    heads = [len(r[0]) - sum(t != -100 for t in r[1]) for r in refs]
    picked = set()
    for i in range(24):
        ids = samples.caption(tok, f"caption {i}", 300, T,
                              template="minigpt4_align")[0]["input_ids"].tolist()
        picked |= {j for j, (r, n) in enumerate(zip(refs, heads)) if ids[:n] == r[0][:n]}
    assert len(picked) >= 3


@pytest.mark.parametrize("n_img", [0, 1, 2])
def test_conversations_train_the_answers_of_the_inference_prompt(tok, hf, n_img):
    """A conversation's prompt part is what the processor makes of `build_prompt` (the ids a
    question is asked with at inference); each answer follows as its own encoding + "###"."""
    from owl_jax.data.conversation import Conversation
    turns = (("human", "What is it?"), ("ai", "A red bus."), ("human", "Where?"),
             ("ai", "On the road."))
    conv = Conversation(turns=(("human", "<image>"),) * n_img + turns,
                        images=tuple(f"{i}.jpg" for i in range(n_img)))
    s, reason = samples.conversation(tok, conv, 400, T)
    assert reason == ""
    proc = MiniGPT4Processor(tok, CFG)
    ids = s["input_ids"].tolist()
    first = proc.encode(templates.build_prompt("What is it?", n_img))
    assert ids[:len(first)] == first == ref_context_ids(hf, templates.build_prompt(
        "What is it?", n_img))
    a1 = hf("A red bus.###", add_special_tokens=False).input_ids
    assert ids[len(first):len(first) + len(a1)] == a1
    second = hf("Human: Where?###Assistant:", add_special_tokens=False).input_ids
    a2 = hf("On the road.###", add_special_tokens=False).input_ids
    assert ids[len(first) + len(a1):] == second + a2
    trained = [i + 1 for i, m in enumerate(s["loss_mask"]) if m]
    want = list(range(len(first), len(first) + len(a1))) + \
        list(range(len(ids) - len(a2), len(ids)))
    assert trained == want and s["num_images"] == n_img


def test_conversation_and_edge_cases(tok, hf):
    from owl_jax.data.conversation import Conversation
    conv = Conversation(turns=(("human", "<image>"), ("human", "What is it?"),
                               ("ai", "A bus.")), images=("a.jpg",))
    s, _ = samples.conversation(tok, conv, 300, T, "minigpt4_align")
    before, _, after = templates.ALIGN_PROMPT.format(
        "<Img><ImageHere></Img> What is it?").partition("<ImageHere>")
    _check(s, *_ref_forward_layout(hf, before, after, "A bus.", "###", 160))
    assert samples.caption(tok, "  ", 100, T) == (None, "empty_text")
    assert samples.caption(tok, "a cat", T - 1, T) == (None, "prompt_too_long")
    with pytest.raises(ValueError, match="take no prompt"):
        samples.caption(tok, "a cat", 100, T, prompt="Describe")
    # the image does not fit: the sample ends before it, with nothing left to train
    assert samples.conversation(tok, conv, 6, T) == (None, "no_trained_tokens")
    bad = Conversation(turns=(("human", "<image>"), ("ai", "A bus.")), images=("a.jpg",))
    assert samples.conversation(tok, bad, 300, T) == (None, "bad_turn_order")
    two = Conversation(turns=conv.turns, images=("a.jpg", "b.jpg"))
    assert samples.conversation(tok, two, 300, T) == (None, "image_count_mismatch")
    with pytest.raises(ValueError, match="unknown MiniGPT-4 caption template"):
        samples.caption(tok, "a cat", 100, T, template="plain")


def test_recipes():
    """MiniGPT-4's stages as configs: only llama_proj trains (its frozen Q-Former without
    dropout); the Q-Former option trains the Q-Former (queries included) and llama_proj."""
    import re
    from owl_jax.configs.minigpt4 import stage1, stage2
    from owl_jax.train import trainable as tr
    from owl_jax.testing.models import random_params
    names = list(tr.flatten(random_params(CFG)))
    for c, want in ((stage1.get_config(), ("llama_proj",)), (stage2.get_config(), ("llama_proj",)),
                    (stage1.get_config("qformer"), ("qformer", "llama_proj"))):
        assert c.model.family == "minigpt4"
        trained = {k.split("/")[0] for k in names if tr.is_trainable(k, c.trainable)}
        assert trained == set(want)
        assert c.model.dropout == ("qformer" in want)
        assert "qformer/query_tokens" in [k for k in names if tr.is_trainable(k, c.trainable)] \
            or "qformer" not in want
    s1, s2 = stage1.get_config(), stage2.get_config()
    assert s1.data.template == "minigpt4_stage1" and s2.data.template == "minigpt4_align"
    assert [x["weight"] for x in s1.data.sources] == [115, 14]
    assert re.search(r"coco:.*filter_cap\.json\?images=.*/image$", s2.data.sources[0]["spec"])
    assert (s1.optimizer.lr, s1.optimizer.warmup_steps, s1.total_steps) == (1e-4, 5000, 20000)
    assert (s2.optimizer.lr, s2.optimizer.warmup_steps, s2.total_steps) == (3e-5, 200, 1000)
    assert s1.optimizer.weight_decay == s2.optimizer.weight_decay == 0.05
    tiny = stage2.get_config("size=tiny")
    assert tiny.init_from == "" and tiny.batch.seq_len == 64
