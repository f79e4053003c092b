"""Inference-time image preprocessing and batching, exactly as the official `MplugOwlProcessor`.

Images: PIL bicubic resize straight to a square (aspect ratio NOT kept), in the image's own
mode, then RGB, /255, (x - mean) / std, float32 NHWC. Resizing before the RGB conversion
matters for palette ("P") and bilevel ("1") images: PIL resizes those with NEAREST whatever
filter is asked for, and upstream resized them before `CLIPImageProcessor` converted to RGB.

Text: `OwlTokenizer.encode_prompt` per prompt, right-padded with EOS (2) to the longest prompt,
attention mask 0 on the padding (upstream's mask is float; ours is int32).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from owl_jax.families.batching import BatchProcessor, ImageLike, open_image
from owl_jax.families.owl1.config import OwlConfig
from owl_jax.tokenizer import OwlTokenizer

def load_image(src: ImageLike) -> Image.Image:
    """Opens a path / bytes / array / PIL image and returns it as PIL RGB."""
    img = open_image(src)
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image(img: ImageLike, size: int, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
    """float32 [size, size, 3]: bicubic resize in the image's own mode, RGB, /255, normalize."""
    img = open_image(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)  # PIL itself uses NEAREST for P and 1
    if img.mode != "RGB":
        img = img.convert("RGB")
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class Processor(BatchProcessor):
    """prompts + images -> model inputs, as the official processor builds them (rows
    right-padded with EOS)."""

    def __init__(self, tokenizer: OwlTokenizer, cfg: OwlConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.eos_id

    def image(self, img: ImageLike) -> np.ndarray:
        return preprocess_image(img, self.image_size, self.cfg.image_mean, self.cfg.image_std)

    def encode(self, prompt: str) -> list[int]:
        """One prompt's ids: BOS, the text, -1 at each image's slots."""
        return self.tokenizer.encode_prompt(prompt, self.cfg.image_tokens)
