"""LLaVA's processor: image transforms, prompt ids with image slots, batches.

Images (LLaVA's `process_images` / `LazySupervisedDataset`): the image is converted to RGB
first (`Image.open(...).convert("RGB")`: alpha is dropped, not composited), then
  image_aspect_ratio "pad" (v1.5): `expand2square`, a square canvas of the mean colour
      (int(m * 255) per channel: (122, 116, 104) for CLIP) with the image pasted centred
      ((side - w) // 2, (side - h) // 2), then the CLIP processor below (its resize is then a
      plain square resize and its crop a no-op);
  "square" (v1): the CLIP processor alone, so a non-square image loses its borders:
CLIP processor (`CLIPImageProcessor`): bicubic resize of the shortest edge to S (the long
edge becomes int(S * long / short)), centre crop S x S at ((h - S) // 2, (w - S) // 2),
x * (1/255) in float64 cast to float32 (equal, for every uint8, to the float32 x / 255 of
`owl_jax.data.images.normalize_pixels`, which the train step applies on the device), then
(x - mean) / std in float32; NHWC here. LLaVA trains with this same transform (no
augmentation): `train_pixels` is `pixels`, uint8 as the training batch carries images.

Text: LLaVA's `tokenizer_image_token` (masks.image_token_ids), with `cfg.image_tokens` ids of
-1 where the reference has its one -200 per image; batches are right-padded with the
tokenizer's pad id (unk, 0: LLaVA's pad, always inside the vocabulary; llava-hf configs name
32001, an id only their widened embedding has), attention mask 0 on the padding.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from owl_jax.data import fast_resize
from owl_jax.data.images import normalize_pixels
from owl_jax.families.batching import BatchProcessor
from owl_jax.families.llava import masks
from owl_jax.families.batching import ImageLike, open_image


def expand2square(img: Image.Image, fill: Sequence[int]) -> Image.Image:
    """The image centred on a square canvas of colour `fill` (square images unchanged)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_colour(mean: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(m * 255) for m in mean)


def clip_resize_crop(img: Image.Image, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: bicubic shortest-edge resize to `size`, centre crop."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        arr = np.asarray(img, np.uint8)
    else:  # Pillow's bicubic, bit for bit (its own code where the fast path does not apply)
        arr = fast_resize.resize_rgb(img, (new_w, new_h))
        if arr is None:
            arr = np.asarray(img.resize((new_w, new_h), Image.BICUBIC), np.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return arr[top:top + size, left:left + size]


class LlavaProcessor(BatchProcessor):
    """prompts + images -> model inputs, as LLaVA's own code builds them (rows right-padded
    with the tokenizer's pad id: unk, LLaVA's pad)."""

    def __init__(self, tokenizer, cfg):
        if cfg.image_aspect_ratio not in ("square", "pad"):
            raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got "
                             f"{cfg.image_aspect_ratio!r}")
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def pixels(self, img: ImageLike) -> np.ndarray:
        """uint8 [S, S, 3]: RGB, (pad,) resize, crop; not normalized."""
        img = open_image(img)
        img = img if img.mode == "RGB" else img.convert("RGB")
        if self.cfg.image_aspect_ratio == "pad":
            img = expand2square(img, pad_colour(self.cfg.image_mean))
        return clip_resize_crop(img, self.image_size)

    def train_pixels(self, img: ImageLike, rng: np.random.Generator | None = None) -> np.ndarray:
        """The training transform: LLaVA trains with the eval transform (no augmentation), so
        this is `pixels` and `rng` is unused."""
        return self.pixels(img)

    def image(self, img: ImageLike) -> np.ndarray:
        """float32 [S, S, 3], normalized."""
        return normalize_pixels(self.pixels(img), self.cfg.image_mean, self.cfg.image_std)

    def encode(self, prompt: str) -> list[int]:
        """One prompt's ids: `tokenizer_image_token` with `image_tokens` ids of -1 per image."""
        slots = [-1] * self.cfg.image_tokens
        out: list[int] = []
        for i in masks.image_token_ids(self.tokenizer, prompt):
            if i == masks.IMAGE:
                out += slots
            else:
                out.append(i)
        return out
