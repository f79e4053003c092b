"""LLaVA processor: image transforms against transformers' CLIP image processor and a numpy
expand2square, prompt templates, `tokenizer_image_token` ids and the training labels of
`preprocess_v1` / `preprocess_plain`, each against a re-derivation written here from the
reference sheet with transformers' slow (sentencepiece, legacy) LLaMA tokenizer path."""
import dataclasses
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from owl_jax.data.conversation import parse_llava
from owl_jax.decoder.llama import TextConfig
from owl_jax.families.llava import masks
from owl_jax.families.llava.processor import LlavaProcessor, expand2square
from owl_jax.families.llava.templates import build_prompt
from owl_jax.testing.spm import default_corpus, train_tiny_tokenizer
from owl_jax.tokenizer import OwlTokenizer

T = 4  # image slots per image here (576 for LLaVA-1.5)
S = 28
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SYS_USER = ("A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions.")
SYS_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The "
             "assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclasses.dataclass(frozen=True)
class Cfg:  # the LlavaConfig fields the processor reads
    image_size: int = S
    image_mean: tuple = MEAN
    image_std: tuple = STD
    image_tokens: int = T
    image_aspect_ratio: str = "square"
    text: TextConfig = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    texts = default_corpus() + [SYS_USER, SYS_HUMAN] + [
        "USER: What is in the image? ASSISTANT: The bus is red.",
        "Human: Describe the picture.###Assistant: A dog on the grass.###"] * 3
    train_tiny_tokenizer(d, texts=texts)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return OwlTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    """The slow LLaMA tokenizer as LLaVA calls it (legacy, BOS added)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=os.path.join(tok_dir, "tokenizer.model"),
                                legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", special_tokens_pattern="bos")


# -------------------------------------------------------------------------------------------
# Re-derivations of the reference, from the sheet (sections 1.4 to 1.7)


def ref_tokenizer_image_token(hf, prompt):
    chunks = [hf(c).input_ids for c in prompt.split("<image>")]
    out = [chunks[0][0]]
    for k, c in enumerate(chunks):
        if k:
            out.append(-200)
        out.extend(c[1:])
    return out


def ref_expand(ids, labels, max_len):
    """The model side: each -200 becomes T slots (labels ignored), cut to max_len ids."""
    out_ids, out_lab = [], []
    for i, lab in zip(ids, labels):
        out_ids += [-1] * T if i == -200 else [int(i)]
        out_lab += [-100] * T if i == -200 else [int(lab)]
    return out_ids[:max_len], out_lab[:max_len]


def ref_record_to_conversation(record, system=SYS_USER):
    """LazySupervisedDataset + preprocess_multimodal + the TWO-style prompt."""
    has_image = "image" in record
    turns = [dict(t) for t in record["conversations"]]
    if has_image:
        for t in turns:
            if "<image>" in t["value"]:
                t["value"] = ("<image>\n" + t["value"].replace("<image>", "").strip()).strip()
    if turns[0]["from"] != "human":
        turns = turns[1:]
    text = system + " "
    for k, t in enumerate(turns):
        role = "USER" if k % 2 == 0 else "ASSISTANT"
        if t["value"]:
            text += role + ": " + t["value"] + (" " if k % 2 == 0 else "</s>")
        else:
            text += role + ":"
    return text, has_image


def ref_preprocess_v1(hf, text, has_image, model_max_length):
    if has_image:
        ids = np.array(ref_tokenizer_image_token(hf, text))
        n = lambda s: len(ref_tokenizer_image_token(hf, s))  # noqa: E731
    else:
        ids = np.array(hf(text, max_length=model_max_length, truncation=True).input_ids)
        n = lambda s: len(hf(s).input_ids)  # noqa: E731
    target = ids.copy()
    total_len = int((target != 0).sum())
    cur_len = 1
    target[:cur_len] = -100
    for rou in text.split("</s>"):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        parts[0] += " ASSISTANT: "
        round_len = n(rou)
        instruction_len = n(parts[0]) - 2
        target[cur_len:cur_len + instruction_len] = -100
        cur_len += round_len
    target[cur_len:] = -100
    if cur_len < model_max_length and cur_len != total_len:
        target[:] = -100
    return ids, target


def check_against_reference(sample, reason, ids, target, seq_len):
    exp_ids, exp_lab = ref_expand(ids, target, seq_len + 1)
    exp_mask = [float(lab != -100) for lab in exp_lab[1:]] + [0.0]
    if not any(exp_mask):
        assert sample is None and reason in ("tokenization_mismatch", "no_trained_tokens")
        return
    assert reason == "" and sample is not None
    assert sample["input_ids"].tolist() == exp_ids
    assert sample["loss_mask"].tolist() == exp_mask
    assert sample["num_images"] == exp_ids.count(-1) // T


# -------------------------------------------------------------------------------------------
# Images


def _rand(h, w, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    return img if mode == "RGB" else img.convert(mode) if mode != "P" else img.quantize(37)


def hf_clip(img):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    p = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                              do_center_crop=True, image_mean=list(MEAN), image_std=list(STD))
    return np.asarray(p(img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)


IMAGES = {"odd_portrait": (53, 37, "RGB"), "landscape": (31, 64, "RGB"),
          "square": (40, 40, "RGB"), "palette": (29, 45, "P"), "gray": (33, 50, "L"),
          "small": (11, 17, "RGB"), "exact": (S, S, "RGB"), "one_off": (S + 1, S, "RGB")}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_square_matches_clip_image_processor(tok, name):
    h, w, mode = IMAGES[name]
    img = _rand(h, w, seed=len(name), mode=mode)
    proc = LlavaProcessor(tok, Cfg())
    out = proc.image(img)
    assert out.shape == (S, S, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, hf_clip(img))
    np.testing.assert_array_equal(proc.train_pixels(img, np.random.default_rng(0)),
                                  proc.pixels(img))


def test_alpha_is_dropped_before_processing(tok):
    """LLaVA opens images with .convert("RGB") (alpha dropped); transformers 5 would composite
    transparent pixels on white, so the reference here is the RGB-converted image."""
    a = np.random.default_rng(3).integers(0, 256, (30, 41, 4), dtype=np.uint8)
    img = Image.fromarray(a, "RGBA")
    np.testing.assert_array_equal(LlavaProcessor(tok, Cfg()).image(img),
                                  hf_clip(img.convert("RGB")))


def ref_expand2square(a, fill):
    h, w = a.shape[:2]
    if h == w:
        return a
    s = max(h, w)
    out = np.empty((s, s, 3), np.uint8)
    out[:] = fill
    if w > h:
        out[(w - h) // 2:(w - h) // 2 + h] = a
    else:
        out[:, (h - w) // 2:(h - w) // 2 + w] = a
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_pad_matches_expand2square_then_clip(tok, name):
    h, w, mode = IMAGES[name]
    img = _rand(h, w, seed=len(name) + 7, mode=mode)
    rgb = np.asarray(img.convert("RGB"))
    fill = tuple(int(m * 255) for m in MEAN)
    assert fill == (122, 116, 104)
    padded = ref_expand2square(rgb, fill)
    np.testing.assert_array_equal(np.asarray(expand2square(img.convert("RGB"), fill)), padded)
    proc = LlavaProcessor(tok, Cfg(image_aspect_ratio="pad"))
    np.testing.assert_array_equal(proc.image(img), hf_clip(Image.fromarray(padded)))
    if h != w:  # the borders survive, unlike the square mode's crop
        assert not np.array_equal(proc.image(img), LlavaProcessor(tok, Cfg()).image(img))


def test_bad_aspect_ratio(tok):
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        LlavaProcessor(tok, Cfg(image_aspect_ratio="anyres"))


# -------------------------------------------------------------------------------------------
# Templates


def test_vicuna_v1_prompts():
    assert build_prompt("What is this?") == (
        SYS_USER + " USER: <image>\nWhat is this? ASSISTANT:")
    assert build_prompt(["Q1?", "A1.", "Q2?"], n_images=1, template="v1") == (
        SYS_USER + " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT:")
    assert build_prompt(["Q1?", "A1."], n_images=0) == SYS_USER + " USER: Q1? ASSISTANT: A1.</s>"
    assert build_prompt("Q?", n_images=2).endswith(" USER: <image>\n<image>\nQ? ASSISTANT:")


def test_other_templates():
    assert build_prompt("Q?", template="llava_v1") == (
        SYS_HUMAN + " USER: <image>\nQ? ASSISTANT:")
    assert build_prompt(["Q?", "A."], template="llava_v0") == (
        SYS_HUMAN + "###Human: <image>\nQ?###Assistant: A.###")
    assert build_prompt("Q?", template="llava_v0") == (
        SYS_HUMAN + "###Human: <image>\nQ?###Assistant:")
    assert build_prompt("Describe it.", template="plain") == "<image>"
    assert build_prompt(["Describe it.", "a red bus"], template="plain") == "<image>a red bus\n"
    with pytest.raises(ValueError, match="unknown LLaVA template"):
        build_prompt("Q?", template="v0")


# -------------------------------------------------------------------------------------------
# Prompt ids


PROMPTS = [build_prompt("What is in the image?", n) for n in (0, 1, 2)] + [
    "<image>", "<image><image>", "Describe <image> and<image>", "a</s>b <image>\n",
    build_prompt(["Q1?", "The dog.", "Q2?"]), build_prompt("Ω café 😀", template="llava_v0")]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_is_tokenizer_image_token(tok, hf, prompt):
    ref = ref_tokenizer_image_token(hf, prompt)
    expected = [x for i in ref for x in ([-1] * T if i == -200 else [i])]
    assert LlavaProcessor(tok, Cfg()).encode(prompt) == expected


def test_text_after_image_starts_a_fresh_encoding(tok):
    ids = LlavaProcessor(tok, Cfg()).encode(build_prompt("What?"))
    after = ids.index(-1) + T
    assert [tok.id_to_piece(i) for i in ids[after:after + 2]] == ["▁", "<0x0A>"]


def test_batch(tok):
    proc = LlavaProcessor(tok, Cfg(image_aspect_ratio="pad"))
    prompts = [build_prompt("What is it?"), build_prompt("Compare them, please.", n_images=2),
               build_prompt("Hello", n_images=0)]
    imgs = [_rand(20, 30, 1), [_rand(30, 20, 2), np.asarray(_rand(25, 25, 3))], []]
    out = proc(prompts, imgs)
    rows = [proc.encode(p) for p in prompts]
    L = max(map(len, rows))
    assert out["input_ids"].shape == (3, L) and out["input_ids"].dtype == np.int32
    for b, r in enumerate(rows):
        assert out["input_ids"][b, :len(r)].tolist() == r
        assert (out["input_ids"][b, len(r):] == 0).all()  # pad = unk, LLaVA's pad id
        assert out["attention_mask"][b].tolist() == [1] * len(r) + [0] * (L - len(r))
    assert out["pixel_values"].shape == (3, S, S, 3) and out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"][1], proc.image(imgs[1][0]))
    assert proc("Hi")["pixel_values"].shape == (0, S, S, 3)
    with pytest.raises(ValueError, match="has 1 <image> but 0 images"):
        proc([build_prompt("Q?")], [[]])


# -------------------------------------------------------------------------------------------
# Training labels


def rec(*values, image="000000033471.jpg", first="human"):
    other = "gpt" if first == "human" else "human"
    out = {"id": "x", "conversations": [{"from": (first, other)[k % 2], "value": v}
                                        for k, v in enumerate(values)]}
    if image:
        out["image"] = image
    return out


RECORDS = {
    "two_rounds": rec("<image>\nWhat colors are the bus?", "The bus is white and red.",
                      "Where is it?", "It is on the street, next to a tree."),
    "image_at_end": rec("What is the man holding?\n<image>", "A small dog.",
                        "Is the dog black?", "No, it is white with brown spots."),
    "two_tags_collapse": rec("<image> look <image>\nWhat is here?", "Two cats."),
    "text_only": rec("Tell me about trees.", "Trees are tall plants.", "And grass?",
                     "Grass is green.", "Thanks!", "You are welcome.", image=None),
    "starts_with_gpt": rec("Hello there.", "<image>\nWhat is this?", "A plane in the sky.",
                           first="gpt"),
    "answer_with_space_and_newline": rec("<image>\nDescribe it.", " \nA man and a dog.",
                                         "More?", "\n\nThey sit."),
    "unicode": rec("<image>\nWhat is Ω?", "Ω is omega, café 😀 über 2023."),
    "empty_answer": rec("<image>\nQ?", "", "Again?", "Yes."),
    "eos_in_answer": rec("<image>\nQ?", "A</s>B", "Again?", "Yes."),
    "eos_in_answer_text": rec("Q?", "A</s>B", "Again?", "Yes.", image=None),
    "tag_in_question": rec("<image>\nSay ASSISTANT: hi", "hi", image="x.jpg"),
    "tag_in_question_text": rec("Why ASSISTANT: here?", "Because.", image=None),
    "unk_literal": rec("Tell me <unk> now.", "Ok.", image=None),
    "question_only": rec("<image>\nWhat?"),
}


def _cut_points(hf, record):
    """seq_len values that cut the conversation at telling places: nowhere, one id short of
    the full length, in the last answer, right after the first trained token, right after the
    first "</s>" (where a record the reference would mask for a mismatch escapes the check:
    it only runs when the rounds end inside model_max_length)."""
    text, has_image = ref_record_to_conversation(record)
    ids, target = ref_preprocess_v1(hf, text, has_image, 2048)
    full_ids, full_lab = ref_expand(ids, target, 10**6)
    trained = [i for i, lab in enumerate(full_lab) if lab != -100]
    n = len(full_ids)
    return {"none": 2047, "short_by_one": n - 2,
            "in_last_answer": trained[-1] - 2 if trained else 2 * n // 3,
            "after_first_trained": trained[0] if trained else n // 3,
            "first_round_end": full_ids.index(2) if 2 in full_ids else n // 2}


@pytest.mark.parametrize("cut", ["none", "short_by_one", "in_last_answer", "after_first_trained",
                                 "first_round_end"])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_conversation_labels_match_preprocess_v1(tok, hf, name, cut):
    record = RECORDS[name]
    cuts = _cut_points(hf, record)
    seq_len = cuts[cut]
    text, has_image = ref_record_to_conversation(record)
    ids, target = ref_preprocess_v1(hf, text, has_image, seq_len + 1)
    sample, reason = masks.conversation_sample(tok, record, seq_len, T)
    check_against_reference(sample, reason, ids, target, seq_len)
    if cut != "none" and sample is not None:
        assert len(sample["input_ids"]) == seq_len + 1
    # The rendered text and the list of turns give the same sample (a turn list has an image
    # when a turn holds "<image>", a record when it names an image file).
    turns = [(t["from"], t["value"]) for t in record["conversations"]]
    for other in (text, turns):
        if other is turns and has_image != any("<image>" in v for _, v in turns):
            continue
        s2, r2 = masks.conversation_sample(tok, other, seq_len, T)
        assert r2 == reason
        if sample is not None:
            assert s2["input_ids"].tolist() == sample["input_ids"].tolist()
            assert s2["loss_mask"].tolist() == sample["loss_mask"].tolist()


def test_expected_outcomes(tok):
    """Which of the records above train and which the reference masks entirely."""
    outcome = {n: masks.conversation_sample(tok, r, 2047, T)[1] for n, r in RECORDS.items()}
    assert outcome == {
        "two_rounds": "", "image_at_end": "", "two_tags_collapse": "", "text_only": "",
        "starts_with_gpt": "", "answer_with_space_and_newline": "", "unicode": "",
        "empty_answer": "", "eos_in_answer": "tokenization_mismatch",
        "eos_in_answer_text": "tokenization_mismatch",
        "tag_in_question": "tokenization_mismatch",
        "tag_in_question_text": "tokenization_mismatch",
        "unk_literal": "tokenization_mismatch", "question_only": "tokenization_mismatch"}


def test_mismatch_check_only_inside_the_length(tok, hf):
    """The reference checks the rounds against the length only when they end inside
    model_max_length: cut right after the first "</s>", the record with "</s>" inside an answer
    trains that answer's first part."""
    record = RECORDS["eos_in_answer_text"]
    seq_len = _cut_points(hf, record)["first_round_end"]
    sample, reason = masks.conversation_sample(tok, record, seq_len, T)
    trained = [int(sample["input_ids"][i + 1]) for i in np.flatnonzero(sample["loss_mask"])]
    assert reason == "" and trained == tok.encode("A") + [tok.eos_id]


def test_trained_tokens_are_the_answers_and_their_eos(tok):
    """Hand check of the net effect: the trained targets are each answer (encoded on its own,
    as it follows "ASSISTANT:" at a word boundary) and its </s>; nothing else."""
    record = RECORDS["two_rounds"]
    sample, _ = masks.conversation_sample(tok, record, 2047, T)
    ids, mask = sample["input_ids"], sample["loss_mask"]
    trained = [int(ids[i + 1]) for i in np.flatnonzero(mask)]
    answers = [t["value"] for t in record["conversations"][1::2]]
    assert trained == [x for a in answers for x in tok.encode(a) + [tok.eos_id]]
    assert sample["num_images"] == 1 and ids.tolist().count(-1) == T
    assert ids[0] == tok.bos_id and mask[:ids.tolist().index(-1) + T].sum() == 0


def test_llava_v1_template_and_owl_conversation(tok, hf):
    record = RECORDS["two_rounds"]
    text, has_image = ref_record_to_conversation(record, system=SYS_HUMAN)
    ids, target = ref_preprocess_v1(hf, text, has_image, 2048)
    sample, reason = masks.conversation_sample(tok, record, 2047, T, template="llava_v1")
    check_against_reference(sample, reason, ids, target, 2047)
    # owl_jax's instruction reader puts the image in its own turn; the sample is the same.
    conv = parse_llava(record)
    s2, r2 = masks.conversation_sample(tok, conv, 2047, T, template="llava_v1")
    assert r2 == "" and s2["input_ids"].tolist() == sample["input_ids"].tolist()
    assert s2["loss_mask"].tolist() == sample["loss_mask"].tolist()


def test_image_is_never_cut(tok, hf):
    record = RECORDS["two_rounds"]
    text, _ = ref_record_to_conversation(record)
    at = ref_tokenizer_image_token(hf, text).index(-200)
    sample, reason = masks.conversation_sample(tok, record, at + T - 2, T)
    assert sample is None and reason == "no_trained_tokens"
    full, _ = masks.conversation_sample(tok, record, 2047, T)
    first_trained = int(np.flatnonzero(full["loss_mask"])[0])
    assert first_trained > at + T
    sample, reason = masks.conversation_sample(tok, record, first_trained + 1, T)
    assert reason == "" and len(sample["input_ids"]) == first_trained + 2
    assert sample["num_images"] == 1 and sample["loss_mask"].sum() == 1


def test_bad_records(tok):
    # A trailing question ends the rounds early: the reference masks it all.
    assert masks.conversation_sample(tok, rec("<image>\nQ", "A", "B"), 2047, T) == (
        None, "tokenization_mismatch")
    bad = {"x": 1, "conversations": [{"from": "human", "value": "Q"},
                                     {"from": "human", "value": "Q"}]}
    assert masks.conversation_sample(tok, bad, 100, T) == (None, "not_alternating")
    bad = {"conversations": [{"from": "system", "value": "S"}]}
    assert masks.conversation_sample(tok, bad, 100, T) == (None, "bad_role")
    assert masks.conversation_sample(tok, {"conversations": []}, 100, T) == (None, "empty_text")
    assert masks.conversation_sample(tok, {"image": "a.jpg"}, 100, T) == (None, "missing_field")
    with pytest.raises(ValueError, match="two-style"):
        masks.conversation_sample(tok, RECORDS["two_rounds"], 100, T, template="llava_v0")


# -------------------------------------------------------------------------------------------
# Stage 1 (plain)


def ref_preprocess_plain(hf, caption):
    ids = ref_tokenizer_image_token(hf, "<image>" + caption + "\n")
    n = len(ref_tokenizer_image_token(hf, "<image>"))
    return ids, [-100] * n + ids[n:]


CAPTIONS = ["the divine queen in her elaborate costume", " leading space and trailing  ",
            "Ω 2023 café", "multi\nline caption"]


@pytest.mark.parametrize("seq_len", [2047, 12])
@pytest.mark.parametrize("caption", CAPTIONS)
def test_plain_matches_preprocess_plain(tok, hf, caption, seq_len):
    ids, target = ref_preprocess_plain(hf, caption)
    assert ids[:2] == [tok.bos_id, -200] and target[:2] == [-100, -100]
    sample, reason = masks.caption_sample(tok, caption, seq_len, T)
    check_against_reference(sample, reason, ids, target, seq_len)
    # An LCS-558K record: the human's instruction is replaced by the image alone.
    record = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": caption}]}
    s2, r2 = masks.conversation_sample(tok, record, seq_len, T, template="plain")
    assert r2 == reason and s2["input_ids"].tolist() == sample["input_ids"].tolist()
    assert s2["loss_mask"].tolist() == sample["loss_mask"].tolist()


def test_plain_edge_cases(tok):
    sample, _ = masks.caption_sample(tok, "a red bus", 100, T)
    trained = [int(sample["input_ids"][i + 1]) for i in np.flatnonzero(sample["loss_mask"])]
    assert trained == tok.encode("a red bus\n")  # caption and newline, no EOS
    assert masks.caption_sample(tok, "  ", 100, T) == (None, "empty_text")
    no_image = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert masks.conversation_sample(tok, no_image, 100, T, template="plain") == (
        None, "image_count_mismatch")


def test_with_the_family_config(tok):
    """The processor on the family's own config (its tiny preset) and its FAMILY entry."""
    if importlib.util.find_spec("owl_jax.families.llava.config") is None:
        pytest.skip("no LlavaConfig yet")
    from owl_jax import families
    family = families.get("llava")
    cfg = family.tiny()
    proc = family.processor(tok, cfg)
    out = proc([family.build_prompt("What is it?", 1)], [[_rand(30, 50, 5)]])
    assert (out["input_ids"] == -1).sum() == cfg.image_tokens
    assert out["pixel_values"].shape == (1, cfg.image_size, cfg.image_size, 3)
