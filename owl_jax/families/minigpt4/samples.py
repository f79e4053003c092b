"""MiniGPT-4's training samples, laid out as `MiniGPT4.forward` builds them:

  [BOS] + before + image + after + text,   text = caption + end_sym, tokenized without BOS
                                            (its own sentencepiece call) and cut to max_txt_len

Only the text trains (BOS, prompt and image are -100; MiniGPT-4 pads with EOS and masks pad
ids, and its text never holds an EOS, so every text id trains). Two layouts, by template:

  "" / "minigpt4_stage1"  stage 1 (LAION / CC / SBU pairs; a chat template's name lays
                          captions out so too): no prompt, end_sym "\\n", max_txt_len 32;
                          captions go through BLIP's `blip_caption` cleaning (lowercase,
                          `.!"()*#:;~` to spaces, whitespace collapsed, <= 50 words)
  "minigpt4_align"        stage 2 (cc_sbu_align): "###Human: {} ###Assistant: " around one of
                          the four alignment instructions, chosen by the caption (MiniGPT-4
                          draws one at random per sample), end_sym "###", max_txt_len 160, the
                          raw caption

Conversations (instruction records; MiniGPT-4 v1 itself trains on none) are laid out in the
chat template they are asked in at inference (`templates.build_prompt`: the system text, one
"<Img><ImageHere></Img>" user message per image, the first question joined to the last of
them): every prompt chunk is encoded as `get_context_emb` encodes the prompt (split at the
images, BOS first), each answer with its "###" on its own (as generation appends it after
"Assistant:"); only the answers and their "###" train. template "minigpt4_align" lays out the
first exchange in the stage-2 caption layout instead.

Samples use the convention of `owl_jax.data.tasks`: input_ids with `image_tokens` ids of -1
per image, loss_mask aligned to targets (loss_mask[i] = 1 iff input_ids[i + 1] trains),
num_images; at most seq_len + 1 ids. A sample whose text does not fit is cut; one whose prompt
and image do not fit is dropped.
"""
from __future__ import annotations

import re
import zlib

from owl_jax.data import tasks
from owl_jax.families.minigpt4 import templates
from owl_jax.families.minigpt4.processor import MiniGPT4Processor

STAGE1 = dict(end_sym="\n", max_txt_len=32)
ALIGN = dict(end_sym="###", max_txt_len=160)
TEMPLATES = ("", "minigpt4_stage1", "minigpt4_align")
_PUNCT = re.compile(r"([.!\"()*#:;~])")


def blip_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning (`BlipCaptionProcessor.pre_caption`)."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def layout(tok, before: str, after: str, text: str, seq_len: int, image_tokens: int,
           end_sym: str, max_txt_len: int):
    """(sample, "") or (None, reason) for one image between `before` and `after`."""
    head = [tok.bos_id] + (tok.encode(before) if before else []) + [-1] * image_tokens + \
        (tok.encode(after) if after else [])
    room = seq_len + 1 - len(head)
    if room < 1:
        return None, "prompt_too_long"
    ids = tok.encode(text + end_sym)[:max_txt_len][:room]
    if not ids:
        return None, "empty_text"
    return tasks.make_sample(head + ids, [0] * len(head) + [1] * len(ids), image_tokens), ""


def _split(prompt: str) -> tuple[str, str]:
    before, _, after = prompt.partition(templates.IMAGE_HERE)
    return before, after


def caption(tok, text: str, seq_len: int, image_tokens: int, prompt: str = "",
            template: str = ""):
    if template not in TEMPLATES + tuple(templates.TEMPLATES):
        raise ValueError(f"unknown MiniGPT-4 caption template {template!r}; known: "
                         f"{', '.join(repr(t) for t in TEMPLATES)} (a chat template name "
                         f"lays captions out as stage 1)")
    text = text.strip() if isinstance(text, str) else ""
    if template == "minigpt4_align":
        if not text:
            return None, "empty_text"
        pick = zlib.crc32(text.encode("utf-8"))
        before, after = _split(prompt and templates.ALIGN_PROMPT.format(prompt)
                               or templates.instruction(pick))
        return layout(tok, before, after, text, seq_len, image_tokens, **ALIGN)
    if prompt:
        raise ValueError("MiniGPT-4's stage-1 captions take no prompt")
    text = blip_caption(text)
    if not text:
        return None, "empty_text"
    return layout(tok, "", "", text, seq_len, image_tokens, **STAGE1)


def _exchanges(conv) -> tuple[list[str], int] | None:
    """(turns alternating question, answer; images) of a Conversation, None if malformed."""
    n_img = sum(1 for r, t in conv.turns if r == "human" and t == "<image>")
    turns: list[str] = []
    for role, text in conv.turns:
        if role == "human" and text == "<image>":
            continue
        want = "human" if len(turns) % 2 == 0 else "ai"
        if role != want:
            return None
        turns.append(text.strip())
    if len(turns) % 2:
        turns = turns[:-1]   # a last question without its answer trains nothing
    return turns, n_img


def conversation(tok, conv, seq_len: int, image_tokens: int, template: str = ""):
    """An instruction record (`owl_jax.data.conversation.Conversation`) in the chat template
    (or, with "minigpt4_align", its first exchange in the stage-2 layout)."""
    got = _exchanges(conv)
    if got is None:
        return None, "bad_turn_order"
    turns, n_img = got
    if n_img != len(conv.images):
        return None, "image_count_mismatch"
    if not turns or not all(turns[1::2]):
        return None, "empty_text"
    if template == "minigpt4_align":
        if n_img != 1:
            return None, "image_count_mismatch"
        before, after = _split(templates.ALIGN_PROMPT.format(templates.IMAGE + " " + turns[0]))
        return layout(tok, before, after, turns[1], seq_len, image_tokens, **ALIGN)
    chat = template if template in templates.TEMPLATES else templates.DEFAULT
    pieces = templates.render_pieces(templates.chat_messages(turns, n_img), chat)
    ids, labels, limit = [tok.bos_id], [0], seq_len + 1
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:   # neighbouring prompt pieces are one chunk of the prompt
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    full = False
    for text, trained in merged:
        if full or len(ids) >= limit:
            break
        if trained:
            new = tok.encode(text)[:limit - len(ids)]
            ids, labels = ids + new, labels + [1] * len(new)
            continue
        for i, chunk in enumerate(text.split(templates.IMAGE_HERE)):
            if i:
                if len(ids) + image_tokens > limit:
                    full = True   # an image is never cut: it ends the sample
                    break
                ids, labels = ids + [-1] * image_tokens, labels + [0] * image_tokens
            new = tok.encode(chunk)[:limit - len(ids)] if chunk else []
            ids, labels = ids + new, labels + [0] * len(new)
    sample = tasks.make_sample(ids, labels, image_tokens)
    if not sample["loss_mask"].any():
        return None, "no_trained_tokens"
    return sample, ""


def pixels(img, cfg, augment: bool, rng=None):
    proc = MiniGPT4Processor(None, cfg)
    return proc.train_pixels(img, rng) if augment else proc.pixels(img)
