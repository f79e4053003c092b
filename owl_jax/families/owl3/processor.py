"""mPLUG-Owl3's processor: its chat template, `<|image|>` placeholders as media slots, images.

Template (the official `build_text_qwen`): "<|im_start|>system\\n<|im_end|>" (no newline after
it), then "\\n<|im_start|>user\\n{content}<|im_end|>" per user turn, and a generation prompt
ends in "\\n<|im_start|>assistant\\n". The content is split at every `<|image|>` and each piece
is tokenized on its own (the placeholder too: ordinary BPE text, several tokens); the first
token of each placeholder becomes a media slot (`model.media_id`), in the order the images
are given.

Images (`cut_enable=False` of the official processor: one view per image): RGB, bicubic resize
to S x S (aspect ratio not kept), x / 255, (x - 0.5) / 0.5.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from owl_jax.families.owl1.processor import open_image
from owl_jax.families.owl3.model import media_id

IMAGE = "<|image|>"
SYSTEM = "<|im_start|>system\n<|im_end|>"


def build_prompt(question_or_turns, n_images: int = 0) -> str:
    """A generation prompt: the images' placeholders (then a newline) before the question, as
    the official examples write them; or turns [(role, text), ...] as they are."""
    if isinstance(question_or_turns, str):
        content = IMAGE * n_images + ("\n" if n_images else "") + question_or_turns
        turns = [("user", content)]
    else:
        turns = list(question_or_turns)
    out = SYSTEM if not turns or turns[0][0] != "system" else ""
    for role, text in turns:
        if role == "system":
            out += f"<|im_start|>system\n{text}<|im_end|>"
        elif role == "user":
            out += f"\n<|im_start|>user\n{text}<|im_end|>"
        else:
            out += f"\n<|im_start|>assistant\n{text}<|im_end|>"
    return out + "\n<|im_start|>assistant\n"


class Owl3Processor:
    """prompts + images -> {input_ids (media slots negative), attention_mask, pixel_values}.
    `tokenizer` needs `encode(text) -> ids` (no special tokens added) and `pad_id`."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def encode(self, prompt: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(prompt.split(IMAGE)):
            if i:
                slot = self.tokenizer.encode(IMAGE)
                ids += [media_id(slot[0])] + list(slot[1:])
            if piece:
                ids += self.tokenizer.encode(piece)
        return ids

    def image(self, img) -> np.ndarray:
        s = self.image_size
        img = open_image(img).convert("RGB").resize((s, s), Image.BICUBIC)
        x = np.asarray(img, np.float32) / 255.0
        mean = np.asarray(self.cfg.image_mean, np.float32)
        std = np.asarray(self.cfg.image_std, np.float32)
        return (x - mean) / std

    def __call__(self, prompts: Sequence[str] | str, images=None) -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        rows, pixels = [], []
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            imgs = [imgs] if isinstance(imgs, (Image.Image, np.ndarray, str, bytes)) else imgs
            n = prompt.count(IMAGE)
            if n != len(imgs):
                raise ValueError(f"prompt {i} has {n} {IMAGE} but {len(imgs)} images were "
                                 f"given: {prompt!r}")
            rows.append(self.encode(prompt))
            pixels += [self.image(im) for im in imgs]
        length = max(len(r) for r in rows)
        pad = getattr(self.tokenizer, "pad_id", 0)
        ids = np.full((len(rows), length), pad, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = 1
        s = self.image_size
        pv = np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.float32)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}
