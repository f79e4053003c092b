"""Training tasks: text (+ image slots) -> token ids and a loss mask, one sample at a time.

A sample is a dict:
  input_ids  int32 [n]   BOS first, a run of `image_tokens` ids of -1 per image;
  loss_mask  float32 [n] aligned to TARGETS: loss_mask[i] = 1 iff ids[i + 1] is trained, so
                         loss_mask[n - 1] = 0 (the last token predicts nothing);
  num_images int         image runs in input_ids (after truncation);
  images     float32 [num_images, H, W, 3], only when the record carried decoded images
                         (`images` key); images whose slots were truncated away are dropped.

`max_length` has the official meaning: a sample holds at most max_length + 1 ids (the official
code pads to max_length + 1 and trains max_length targets), i.e. max_length slots once packed.

Instruction tuning reproduces the official `_extract_text_token_from_conversation`
(`pipeline/data_utils/xgpt3_dataset.py`): split on `<image>`, `AI: `, `\\nHuman: `; encode every
piece on its own; the piece after `AI: ` is a response, trained together with an EOS appended
to it; greedy truncation piece by piece. Samples with nothing trained are dropped and counted
(upstream's loss would be 0/0 = NaN on them).
"""
from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np

from owl_jax.tokenizer import AI, IMAGE_TOKEN, OwlTokenizer

_SPLIT_MULTIMODAL = re.compile("(" + "|".join(map(re.escape, [IMAGE_TOKEN, AI, "\nHuman: "]))
                               + ")")
_SPLIT_TEXT = re.compile("(" + "|".join(map(re.escape, [AI, "\nHuman: "])) + ")")


def _sample(ids: list[int], labels: list[int], image_tokens: int) -> dict[str, Any]:
    # (lists until the end: a handful of small numpy ops cost more than the lists, per sample)
    # Target alignment: position i is trained when the token it predicts (i + 1) is labelled;
    # image slots never are.
    mask = [lab if t >= 0 else 0 for lab, t in zip(labels[1:], ids[1:])]
    mask.append(0)
    # Images are never cut, so slots / image_tokens counts them (adjacent images included).
    num_images = ids.count(-1) // image_tokens if image_tokens else 0
    return {"input_ids": np.array(ids, np.int32), "loss_mask": np.array(mask, np.float32),
            "num_images": num_images}


def tokenize_conversation(tok: OwlTokenizer, text: str, max_length: int,
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
    sample = _sample(ids, labels, image_tokens)
    if not sample["loss_mask"].any():
        return None, "no_trained_tokens"
    return sample, ""


def caption_sample(tok: OwlTokenizer, caption: str, max_length: int, image_tokens: int,
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
    return _sample(head + text, [0] * len(head) + [1] * len(text), image_tokens), ""


def text_sample(tok: OwlTokenizer, text: str, max_length: int) -> tuple[dict[str, Any] | None, str]:
    """Plain language-model text (no template): [BOS] + text + [EOS], every token trained."""
    text = text if isinstance(text, str) else ""
    if not text.strip():
        return None, "empty_text"
    ids = [tok.bos_id] + tok.encode(text)[:max_length - 1] + [tok.eos_id]
    return _sample(ids, [0] + [1] * (len(ids) - 1), 0), ""


def _attach_images(sample: dict[str, Any], record: dict[str, Any]) -> str:
    """Keeps the decoded images whose slots survived truncation. Returns a drop reason or ""."""
    images = record.get("images")
    if images is None:
        return ""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] < sample["num_images"]:
        return "image_count_mismatch"
    sample["images"] = images[:sample["num_images"]]
    return ""


class _Task:
    """Callable record -> sample | None, usable as a grain map; counts dropped samples per
    reason in `dropped` (per process: with grain workers, each worker has its own copy)."""

    def __init__(self, tokenizer: OwlTokenizer, max_length: int, image_tokens: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.image_tokens = image_tokens
        self.dropped: collections.Counter = collections.Counter()
        self.kept = 0

    def _make(self, record):
        raise NotImplementedError

    def __call__(self, record: dict[str, Any]) -> dict[str, Any] | None:
        sample, reason = self._make(record)
        if sample is not None:
            reason = _attach_images(sample, record)
        if reason:
            self.dropped[reason] += 1
            return None
        self.kept += 1
        return sample


class InstructionTask(_Task):
    """Official stage-2 records (`{"text": ..., "image": [...], "images": decoded?}`)."""

    def _make(self, record):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            return None, "missing_text"
        return tokenize_conversation(self.tok, text, self.max_length, self.image_tokens)


class CaptionTask(_Task):
    """Stage-1 pairs (`{"text": caption, "images": [1, H, W, 3]?}`)."""

    def __init__(self, tokenizer, max_length, image_tokens, prompt: str = ""):
        super().__init__(tokenizer, max_length, image_tokens)
        self.prompt = prompt

    def _make(self, record):
        text = record.get("text") if isinstance(record, dict) else None
        return caption_sample(self.tok, text, self.max_length, self.image_tokens, self.prompt)


class TextTask(_Task):
    """Language-only text, every token trained."""

    def __init__(self, tokenizer, max_length):
        super().__init__(tokenizer, max_length, 0)

    def _make(self, record):
        text = record.get("text") if isinstance(record, dict) else None
        return text_sample(self.tok, text, self.max_length)
