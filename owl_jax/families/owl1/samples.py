"""Owl v1's training samples: the official stage-1 caption and stage-2 conversation layouts
and its image augmentation.

Instruction tuning reproduces the official `_extract_text_token_from_conversation`
(`pipeline/data_utils/xgpt3_dataset.py`): split on `<image>`, `AI: `, `\\nHuman: `; encode every
piece on its own; the piece after `AI: ` is a response, trained together with an EOS appended
to it; greedy truncation piece by piece. Samples with nothing trained are dropped and counted
(upstream's loss would be 0/0 = NaN on them).
"""
from __future__ import annotations

import re
from typing import Any

from owl_jax.data import images
from owl_jax.data.conversation import AI, HUMAN
from owl_jax.data.tasks import make_sample
from owl_jax.tokenizer import IMAGE_TOKEN

_SPLIT_MULTIMODAL = re.compile("(" + "|".join(map(re.escape, [IMAGE_TOKEN, AI, "\n" + HUMAN]))
                               + ")")
_SPLIT_TEXT = re.compile("(" + "|".join(map(re.escape, [AI, "\n" + HUMAN])) + ")")


def tokenize_conversation(tok, text: str, max_length: int,
                          image_tokens: int) -> tuple[dict[str, Any] | None, str]:
    """Official chunk-wise tokenization of one training conversation.

    Returns (sample, "") or (None, reason). Upstream has two code paths, kept here:
    conversations with an image drop empty pieces after splitting, text-only ones do not (so
    an empty answer there still trains its EOS).
    """
    limit = max_length + 1  # ids a sample may hold
    multimodal = IMAGE_TOKEN in text
    if multimodal:
        pieces = [p for p in _SPLIT_MULTIMODAL.split(text) if p]
    else:
        pieces = _SPLIT_TEXT.split(text)
    if not pieces:
        return None, "empty_text"
    ids = [tok.bos_id] + tok.encode(pieces[0])  # the first piece (system line) is never cut
    labels = [0] * len(ids)
    if len(ids) > limit:
        return None, "prompt_too_long"  # upstream's length assertion fails on these
    for prev, piece in zip(pieces, pieces[1:]):
        if len(ids) >= limit:
            break
        if multimodal and piece == IMAGE_TOKEN:
            if len(ids) + image_tokens > limit:
                break  # an image that does not fit ends the sample
            ids += [-1] * image_tokens
            labels += [0] * image_tokens
        elif prev == AI:
            # A response: cut to leave room for its EOS, which is always appended and trained.
            resp = tok.encode(piece)[:max_length - len(ids)] + [tok.eos_id]
            ids += resp
            labels += [1] * len(resp)
        else:
            chunk = tok.encode(piece)[:limit - len(ids)]
            ids += chunk
            labels += [0] * len(chunk)
    sample = make_sample(ids, labels, image_tokens)
    if not sample["loss_mask"].any():
        return None, "no_trained_tokens"
    return sample, ""


def caption_sample(tok, caption: str, max_length: int, image_tokens: int,
                   prompt: str = "") -> tuple[dict[str, Any] | None, str]:
    """Stage-1 image-text pair: [BOS] + prompt + image slots + caption + [EOS], loss on the
    caption and its EOS. Upstream publishes no stage-1 script; this mirrors the paper (the
    language-modelling loss on the text, conditioned on the image) and the chunking of the
    stage-2 code (the caption is encoded as its own piece, so it starts with "▁")."""
    caption = caption.strip() if isinstance(caption, str) else ""
    if not caption:
        return None, "empty_text"
    head = [tok.bos_id] + (tok.encode(prompt) if prompt else []) + [-1] * image_tokens
    room = max_length + 1 - len(head) - 1
    if room < 1:
        return None, "prompt_too_long"
    text = tok.encode(caption)[:room] + [tok.eos_id]
    return make_sample(head + text, [0] * len(head) + [1] * len(text), image_tokens), ""


def caption(tok, text: str, seq_len: int, image_tokens: int, prompt: str = "",
            template: str = ""):
    return caption_sample(tok, text, seq_len, image_tokens, prompt)


def conversation(tok, conv, seq_len: int, image_tokens: int, template: str = ""):
    """conv: an `owl_jax.data.conversation.Conversation`, in the official text form."""
    return tokenize_conversation(tok, conv.text(), seq_len, image_tokens)


def pixels(img, cfg, augment: bool, rng=None):
    """uint8 [S, S, 3]: RandomResizedCrop + flip (augment), else a bicubic square resize."""
    size = cfg.vision.image_size
    if augment:
        return images.random_resized_crop_flip(img, size, rng)
    return images.resize_square(img, size)
